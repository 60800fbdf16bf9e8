# shellcheck shell=bash
# Shared helpers of the launch/*.sh scripts (sourced, not run). slurm_gpu.sbatch keeps its own copy:
# SLURM runs a copy of the batch script from its spool directory, where this file is not.

# Quotes one word for a POSIX shell; plain words stay bare so that printed commands read well.
shq() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,~-]+$ ]]; then
    printf '%s' "$1"
  elif [[ $1 != *[\"\$\`\\!]* ]]; then
    printf '"%s"' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}
# Joins words into one command line that a POSIX shell splits back into the same words.
shjoin() {
  local out="" word
  for word in "$@"; do out+="${out:+ }$(shq "$word")"; done
  printf '%s' "$out"
}
# Sets ARGS to the given arguments with a relative --workdir=DIR made absolute under BASE (the
# first argument), so that every process, whatever its current directory, writes to the same
# place; gs:// and other URLs and absolute paths stay as they are, ~ is the home directory.
absolute_workdir_args() {
  local base=$1 arg value
  shift
  ARGS=()
  for arg in "$@"; do
    if [[ $arg == --workdir=* ]]; then
      value=${arg#--workdir=}
      # shellcheck disable=SC2088  # the literal "~" of a path not yet expanded is matched.
      case $value in
        *://* | /*) ;;
        "~" | "~/"*) value=$HOME${value#\~} ;;
        *) value=${base%/}/${value#./} ;;
      esac
      arg=--workdir=$value
    fi
    ARGS+=("$arg")
  done
}
