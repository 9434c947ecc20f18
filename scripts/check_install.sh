#!/usr/bin/env bash
# Does the README's install work on a fresh machine today? Run from anywhere in the repository.
#
#   scripts/check_install.sh            clone HEAD into a temporary folder, make a fresh venv, run the
#                                       README's command 1 as written (its training job swapped for
#                                       solver=drum_rnn/debug) and command 2 (the tests)
#   scripts/check_install.sh --quick    the same, command 2 with the unit tests only
#   scripts/check_install.sh --wheel    also: build the wheel, install it (with constraints.txt) into
#                                       a second fresh venv, train and resume from an empty folder
#   scripts/check_install.sh --latest   instead: resolve the newest versions pyproject.toml's ranges
#                                       allow, without constraints.txt; if that fails, name the
#                                       direct dependency that, held at its known-good version, lets
#                                       everything else resolve at its newest (the one that broke it)
#   scripts/check_install.sh --latest --write
#                                       and if it resolves, install that set, run the unit tests on
#                                       it and write it to constraints.txt (review, then commit)
set -euo pipefail
repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
quick=0 wheel=0 latest=0 write=0
for arg in "$@"; do
  case "$arg" in
    --quick) quick=1 ;; --wheel) wheel=1 ;; --latest) latest=1 ;; --write) write=1 ;;
    *) sed -n '2,17p' "$0"; exit 2 ;;
  esac
done
work=$(mktemp -d -t solver-install-XXXXXX)
trap 'rm -rf "$work"' EXIT
log() { printf '\n== %s\n' "$*"; }
quiet() { grep -v "WARNING: Location" || true; }

log "fresh clone of $(git -C "$repo" rev-parse --short HEAD) in $work/solver"
git clone --quiet "$repo" "$work/solver"
cd "$work/solver"
install=$(grep -m1 '^python3 -m venv .venv' README.md)
tests=$(grep -m1 '^python -m pytest' README.md)

if (( latest )); then
  python3 -m venv .venv
  PY=.venv/bin/python
  "$PY" -m pip install --quiet --upgrade pip 2>&1 | quiet  # the newest resolver backtracks best
  "$PY" -m pip install --quiet torch==2.13.0 2>&1 | quiet
  log "newest versions the ranges allow (no constraints.txt)"
  if "$PY" -m pip install --dry-run --report "$work/report.json" -e '.[test]' > "$work/resolve.log" 2>&1; then
    "$PY" - "$work/report.json" "$repo/constraints.txt" <<'EOF'
import json, re, sys
new = {i['metadata']['name'].lower().replace('_', '-'): i['metadata']['version']
       for i in json.load(open(sys.argv[1]))['install'] if i['metadata']['name'] != 'solver'}
pinned = dict(re.match(r'([^=]+)==(.+)', line).groups() for line in open(sys.argv[2])
              if '==' in line and not line.startswith('#'))
pinned = {k.lower().replace('_', '-'): v for k, v in pinned.items()}
changed = sorted(k for k in new if pinned.get(k) != new[k])
print(f"resolves: {len(new)} packages, {len(changed)} differ from constraints.txt")
for k in changed:
    print(f"  {k}: {pinned.get(k, '(new)')} -> {new[k]}")
EOF
    if (( write )); then
      log "installing the newest set and running the unit tests on it"
      "$PY" -m pip install --quiet -e '.[test]' 2>&1 | quiet
      "$PY" -m pytest -q -m 'not integration' -p no:cacheprovider | tail -3
      { sed -n '/^#/p' "$repo/constraints.txt"; "$PY" -m pip freeze --exclude-editable | grep -v '^solver' | sed 's/+cpu$//'; } \
        > "$repo/constraints.txt.new"
      mv "$repo/constraints.txt.new" "$repo/constraints.txt"
      log "wrote $repo/constraints.txt: review with git diff, run the whole suite, commit"
    fi
    exit 0
  fi
  log "the newest versions do not resolve; pip says:"
  sed -n "/conflict is caused by/,/^$/p" "$work/resolve.log" | head -20
  log "each direct dependency held at its constraints.txt version, every other one at its newest"
  "$PY" - > "$work/direct.txt" <<'EOF'
import re, tomllib
project = tomllib.load(open('pyproject.toml', 'rb'))['project']
deps = project['dependencies'] + [d for extra in project['optional-dependencies'].values() for d in extra]
for dep in dict.fromkeys(re.match(r'[A-Za-z0-9_.-]+', d).group(0).lower() for d in deps):
    print(dep)
EOF
  broke=0
  while read -r dep; do
    [[ "$dep" == torch ]] && continue  # held at 2.13.0 anyway: the only CPU build here
    grep -iE "^${dep//-/[-_]}(\[.*\])?==" "$repo/constraints.txt" > "$work/held.txt" || true
    if "$PY" -m pip install --dry-run --quiet -e '.[test]' -c "$work/held.txt" > "$work/one.log" 2>&1; then
      echo "  BREAKS $dep: held at $(cut -d= -f3 "$work/held.txt"), everything else resolves at its newest"
      broke=1
    else
      echo "  -      $dep: holding it back does not help"
    fi
  done < "$work/direct.txt"
  (( broke )) && echo "Keep constraints.txt; cap the range of the package marked BREAKS in pyproject.toml (or wait for a fix upstream)."
  exit 1
fi

log "README command 1: ${install/solver=drum_rnn/solver=drum_rnn/debug}"
start=$SECONDS
(set +u; eval "${install/solver=drum_rnn/solver=drum_rnn/debug}") 2>&1 | quiet | tail -3
echo "command 1 took $((SECONDS - start)) s (install and the debug run)"
PY="$PWD/.venv/bin/python"
if (( wheel )); then
  log "the wheel, installed into a second fresh venv, trained from an empty folder"
  "$PY" -m pip wheel --quiet --no-deps -w "$work/dist" . 2>&1 | quiet
  python3 -m venv "$work/wheel-venv"
  "$work/wheel-venv/bin/pip" install --quiet torch==2.13.0 2>&1 | quiet
  "$work/wheel-venv/bin/pip" install --quiet "$work"/dist/solver-*.whl -c constraints.txt 2>&1 | quiet
  mkdir "$work/empty"
  (cd "$work/empty" && for _ in 1 2; do env -u SOLVER_DORA_DIR "$work/wheel-venv/bin/dora" -P solver run \
    solver=drum_rnn/debug 2>&1 | tail -1; done && "$work/wheel-venv/bin/solver" ls)
fi
log "README command 2: ${tests/python/$PY}$( (( quick )) && echo " -m 'not integration'")"
if (( quick )); then
  eval "${tests/python/$PY} -m 'not integration'"
else
  eval "${tests/python/$PY}"
fi
