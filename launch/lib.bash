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
