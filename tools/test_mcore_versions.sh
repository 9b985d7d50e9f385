#!/usr/bin/env bash
# Run the CPU test suite against several megatron-core releases (docs/training.md, "megatron-core versions").
# megatron-core >= 0.17 needs Python 3.12; CI (Python 3.11) only gets 0.16.1, so this is run by hand.
#
#     bash tools/test_mcore_versions.sh [-p PYTHON3.12] [-v VENV] [VERSION ...] [-- PYTEST ARGS]
#
# defaults: PYTHON = python3.12 on PATH, VENV = .venv-mcore (ignored by git), versions 0.17.1 0.18.2 0.19.2,
# pytest args `-q tests`. One venv is made once (torch 2.13.0 from PyPI, the project editable); each version is then
# installed in turn and the suite run, its last line printed as "megatron-core X: ...". Logs: VENV/logs/X.log.
set -uo pipefail
py=python3.12 venv=.venv-mcore versions=() pytest_args=()
while (( $# )); do
    case $1 in
        -p) py=$2; shift 2 ;;
        -v) venv=$2; shift 2 ;;
        --) shift; pytest_args=("$@"); break ;;
        -*) echo "unknown option $1 (usage: see the head of $0)" >&2; exit 2 ;;
        *) versions+=("$1"); shift ;;
    esac
done
(( ${#versions[@]} )) || versions=(0.17.1 0.18.2 0.19.2)
(( ${#pytest_args[@]} )) || pytest_args=(-q tests)
cd "$(dirname "$0")/.."
command -v "$py" >/dev/null || { echo "no $py: megatron-core >= 0.17 needs Python 3.12 (pass -p PATH)" >&2; exit 2; }
if [[ ! -x $venv/bin/python ]]; then
    "$py" -m venv "$venv" && "$venv/bin/pip" install -q "torch==2.13.0" && "$venv/bin/pip" install -q -e ".[test]" \
        || { echo "could not set up $venv" >&2; exit 1; }
fi
mkdir -p "$venv/logs"
failed=0
for v in "${versions[@]}"; do
    "$venv/bin/pip" install -q "megatron-core==$v" > "$venv/logs/$v.install.log" 2>&1 \
        || { echo "megatron-core $v: install failed ($venv/logs/$v.install.log)"; failed=1; continue; }
    "$venv/bin/python" -m pytest -p no:cacheprovider "${pytest_args[@]}" > "$venv/logs/$v.log" 2>&1 || failed=1
    echo "megatron-core $v: $(tail -n 1 "$venv/logs/$v.log")"
done
exit $failed
