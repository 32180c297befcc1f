# Sourced by the GPU-machine scripts (gpu_check.sh, gpu_perf.sh, gpu_session.sh): steps that share
# one deadline and leave their results where the device tool brings them back.
#
# The lent machine gives 15 minutes in all (start-up included) and 600 s per command, and brings
# back at most 8 files from $OUT. So: every step's limit is cut to the time left before
# GPU_DEADLINE (epoch seconds, exported: nested scripts share it), a step that cannot start in
# time is recorded as SKIPPED, and after every step the whole output folder is re-archived into
# GPU_ARCHIVE (when set): a command killed at its limit still returns everything done before.

gpu_phases() {  # gpu_phases DEFAULT... -- ARG...: PHASES = the arguments, else the defaults
  local defaults=()
  while [ "$1" != "--" ]; do defaults+=("$1"); shift; done
  shift
  if [ $# -gt 0 ]; then PHASES=("$@"); else PHASES=("${defaults[@]}"); fi
}
has() { [[ " ${PHASES[*]} " == *" $1 "* ]]; }  # whether phase $1 was asked for

gpu_deadline_init() {  # gpu_deadline_init SECONDS: the deadline, unless an outer script set one
  if [ -z "${GPU_DEADLINE:-}" ]; then export GPU_DEADLINE=$(( $(date +%s) + $1 )); fi
}

gpu_archive() {  # refresh GPU_ARCHIVE from GPU_ARCHIVE_ROOT (written aside, then renamed: never half a file)
  [ -n "${GPU_ARCHIVE:-}" ] || return 0
  local root=${GPU_ARCHIVE_ROOT:-$OUT} part="$GPU_ARCHIVE.part"
  (  # one refresh at a time (the two sanitizer steps end together); a log still growing is fine
    flock 9
    tar --warning=no-file-changed -czf "$part" -C "$(dirname "$root")" "$(basename "$root")" 2>/dev/null
    if [ $? -le 1 ]; then mv "$part" "$GPU_ARCHIVE"; else rm -f "$part"; fi
  ) 9>/tmp/gpu_archive.lock
}

step() {  # step NAME LIMIT_SECONDS COMMAND...  (output to OUT/NAME.log, status line to OUT/NAME.status)
  local name=$1 limit=$2; shift 2
  local left=$(( ${GPU_DEADLINE:-$(( $(date +%s) + limit + 10 ))} - $(date +%s) - 10 ))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$left" -lt 15 ]; then
    printf '%-14s %-14s %5ss  %s\n' "$name" "SKIPPED(time)" 0 "-" >"$OUT/$name.status"
    gpu_archive
    return 125
  fi
  local start=$SECONDS
  timeout -k 5 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local status=ok
  { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && status="TIMEOUT(${limit}s)" || { [ $rc -ne 0 ] && status="FAIL(rc=$rc)"; }
  printf '%-14s %-14s %5ss  %s\n' "$name" "$status" $((SECONDS - start)) "$OUT/$name.log" >"$OUT/$name.status"
  gpu_archive
  return $rc
}
