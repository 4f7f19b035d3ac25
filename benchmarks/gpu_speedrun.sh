#!/usr/bin/env bash
# Tiny ImageNet speedrun on one GPU: join the data parts, check the sha256, prepare the cache, train a preset
# within a time budget (resuming across calls), evaluate, and write a JSON summary and the plots.
#
# Made for a GPU machine where one command may run at most 10 minutes and files arrive in parts of at most
# 64 MiB. Every step is idempotent and keeps its state in the work folder, so the same command, called again,
# continues where the last call stopped. Exit status: 0 done (summary written), 75 call again (the training
# stopped at this call's time limit and resumes next call), 3 waiting for data parts, 1 or 2 an error.
#
# On the machine that has the zip, cut it into parts (plus a manifest of their sha256 and the SHA256SUMS
# line):
#     benchmarks/gpu_speedrun.sh split ../shared/data/tiny-imagenet-200-sub.zip runs/parts --part-size 45M
# On the GPU machine, from the repository root, as often as needed (parts may arrive over several calls; each
# call copies the parts it finds into the work folder):
#     benchmarks/gpu_speedrun.sh --parts runs/parts --out "$OUT"
#
# The budget is the trainer's own clock (`train_seconds` in its summary, setup and evaluation included,
# carried across resumes); an epoch cut short by a call's limit is redone after the resume and not counted.
#
# Options (defaults in brackets):
#     --parts DIR       folder where parts (part-*, PARTS.sha256, SHA256SUMS) arrive; may repeat [runs/parts]
#     --zip FILE        a whole zip instead of parts (its sha256 is still checked when a SHA256SUMS is found)
#     --sums FILE       a SHA256SUMS file (sha256sum format) naming the zip [SHA256SUMS beside the parts]
#     --work DIR        persistent work folder: parts, joined zip, cache, run directory [runs/speedrun]
#     --out DIR         where the summary and plots go (at most 8 files) [$OUT, else WORK/out]
#     --preset NAME     training preset [speedrun]
#     --budget SECONDS  training time budget, counted by the trainer across resumes [600]
#     --call-limit S    seconds this call may use in all; training stops in time for the evaluation [570]
#     --python PY       Python with torch [.venv/bin/python if present, else python3]
#     --throughput      also time train steps, data resident vs the notebook's DataLoader (gpu_throughput.py,
#                       seed model, batch 64), once, into throughput.json
#     --until STEP      stop after this step: data, prepare, train (e.g. a call that only takes in parts)
#     -- key=value ...  config overrides for a new run (e.g. compile=true batch_size=1024)
#
# Outputs in --out: speedrun.json (device, versions, commit, data, preset, budget, train summary, eval of
# best.pt and last.pt, EMA where enabled, seconds per phase), config.yaml, metrics.jsonl, loss.png,
# accuracy.png, lr.png, speedrun.log, and throughput.json with --throughput: 8 files. The data is whatever
# zip arrives: the shared subset holds 250 train images per class (half the official training set) and 10 val
# images per class.
set -euo pipefail

CALL_START=$SECONDS
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

die() {
    echo "gpu_speedrun: error: $*" >&2
    exit 2
}

log() {
    echo "gpu_speedrun: $*"
}

sha_of() {
    sha256sum "$1" | cut -d' ' -f1
}

expected_sha() {  # expected_sha SUMS_FILE NAME: the sha256 listed for NAME (or the only line's)
    local file="$1" name="$2" line
    line="$(grep -E "[ *]$name\$" "$file" || true)"
    if [[ -z "$line" && "$(grep -c . "$file")" == "1" ]]; then line="$(cat "$file")"; fi
    [[ -n "$line" ]] || die "$file lists no sha256 for $name"
    echo "${line%% *}"
}

# ----------------------------------------------------------------------------------------------------------
# split: the sending side

cmd_split() {
    local zip="" dest="" size="45M"
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --part-size) size="$2"; shift 2 ;;
            -*) die "split: unknown option $1" ;;
            *)
                if [[ -z "$zip" ]]; then zip="$1"
                elif [[ -z "$dest" ]]; then dest="$1"
                else die "split: too many arguments"
                fi
                shift ;;
        esac
    done
    [[ -n "$zip" && -n "$dest" ]] || die "split: usage: gpu_speedrun.sh split ZIP DEST_DIR [--part-size 45M]"
    [[ -f "$zip" ]] || die "split: zip not found: $zip"
    mkdir -p "$dest"
    rm -f "$dest"/part-*
    split -b "$size" -d -a 3 "$zip" "$dest/part-"
    local name
    name="$(basename "$zip")"
    (cd "$dest" && sha256sum part-* > PARTS.sha256 && echo "$name" > PARTS.name)
    local sums
    sums="$(dirname "$zip")/SHA256SUMS"
    if [[ -f "$sums" ]]; then  # the published checksum travels with the parts, checked here first
        local want
        want="$(expected_sha "$sums" "$name")"
        [[ "$(sha_of "$zip")" == "$want" ]] || die "split: $zip does not match its $sums"
        grep -E "[ *]$name\$" "$sums" > "$dest/SHA256SUMS"
    else
        echo "$(sha_of "$zip")  $name" > "$dest/SHA256SUMS"
    fi
    log "$(ls "$dest"/part-* | wc -l) parts of at most $size in $dest (manifest PARTS.sha256, SHA256SUMS)"
}

if [[ "${1:-}" == "split" ]]; then
    shift
    cmd_split "$@"
    exit 0
fi

# ----------------------------------------------------------------------------------------------------------
# options

PARTS_DIRS=()
ZIP=""
SUMS=""
WORK="runs/speedrun"
OUT_DIR="${OUT:-}"
PRESET="speedrun"
BUDGET=600
CALL_LIMIT=570
PY=""
THROUGHPUT=0
UNTIL=""
OVERRIDES=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --parts) PARTS_DIRS+=("$2"); shift 2 ;;
        --zip) ZIP="$2"; shift 2 ;;
        --sums) SUMS="$2"; shift 2 ;;
        --work) WORK="$2"; shift 2 ;;
        --out) OUT_DIR="$2"; shift 2 ;;
        --preset) PRESET="$2"; shift 2 ;;
        --budget) BUDGET="$2"; shift 2 ;;
        --call-limit) CALL_LIMIT="$2"; shift 2 ;;
        --python) PY="$2"; shift 2 ;;
        --throughput) THROUGHPUT=1; shift ;;
        --until) UNTIL="$2"; shift 2 ;;
        --) shift; OVERRIDES=("$@"); break ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
[[ ${#PARTS_DIRS[@]} -gt 0 ]] || PARTS_DIRS=("runs/parts")
[[ -z "$UNTIL" || "$UNTIL" =~ ^(data|prepare|train)$ ]] \
    || die "--until must be data, prepare or train, got '$UNTIL'"
[[ "$BUDGET" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--budget must be a number of seconds, got '$BUDGET'"
[[ "$CALL_LIMIT" =~ ^[0-9]+$ ]] || die "--call-limit must be a whole number of seconds, got '$CALL_LIMIT'"
if [[ -z "$PY" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY="python3"; fi
fi
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"
OUT_DIR="${OUT_DIR:-$WORK/out}"
mkdir -p "$OUT_DIR" "$WORK/parts" "$WORK/state"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
LOG="$WORK/state/speedrun.log"  # every call's output, copied to --out when a call ends
exec > >(tee -a "$LOG") 2>&1
trap 'sleep 0.2; cp "$LOG" "$OUT_DIR/speedrun.log" 2>/dev/null || true' EXIT
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
log "call started $(date -u +%FT%TZ); work $WORK; out $OUT_DIR; python $PY"

phase_mark() {  # phase_mark NAME SECONDS: add this call's seconds of a phase to the state
    echo "$1 $2" >> "$WORK/state/phases"
}

# ----------------------------------------------------------------------------------------------------------
# 1. data: collect parts, join, check

ZIP_DEST="$WORK/data.zip"
EXPECTED=""

find_sums() {
    if [[ -n "$SUMS" ]]; then
        [[ -f "$SUMS" ]] || die "--sums file not found: $SUMS"
        echo "$SUMS"
        return
    fi
    for d in "$WORK/parts" "${PARTS_DIRS[@]}"; do
        if [[ -f "$d/SHA256SUMS" ]]; then echo "$d/SHA256SUMS"; return; fi
    done
    [[ -n "$ZIP" && -f "$(dirname "$ZIP")/SHA256SUMS" ]] && echo "$(dirname "$ZIP")/SHA256SUMS"
    return 0
}


data_step() {
    local start=$SECONDS
    if [[ -f "$WORK/state/data.ok" && -f "$ZIP_DEST" ]]; then
        log "data: $ZIP_DEST already checked"
        return
    fi
    local sums name
    if [[ -n "$ZIP" ]]; then
        [[ -f "$ZIP" ]] || die "--zip not found: $ZIP"
        cp "$ZIP" "$ZIP_DEST.tmp" && mv "$ZIP_DEST.tmp" "$ZIP_DEST"
        name="$(basename "$ZIP")"
    else
        # collect: copy the parts and manifests that arrived, keeping the ones already here
        local d f
        for d in "${PARTS_DIRS[@]}"; do
            [[ -d "$d" ]] || continue
            for f in "$d"/part-* "$d"/PARTS.sha256 "$d"/PARTS.name "$d"/SHA256SUMS; do
                [[ -f "$f" ]] || continue
                local kept="$WORK/parts/$(basename "$f")"
                if [[ ! -f "$kept" ]] || ! cmp -s "$f" "$kept"; then
                    cp "$f" "$kept.tmp" && mv "$kept.tmp" "$kept"
                fi
            done
        done
        [[ -f "$WORK/parts/PARTS.sha256" ]] || {
            log "data: waiting for parts: no PARTS.sha256 manifest yet in ${PARTS_DIRS[*]} ('split' makes it)"
            exit 3
        }
        local missing=() bad=() part want
        while read -r want part; do
            part="${part#\*}"
            if [[ ! -f "$WORK/parts/$part" ]]; then
                missing+=("$part")
            elif [[ "$(sha_of "$WORK/parts/$part")" != "$want" ]]; then
                bad+=("$part")
            fi
        done < "$WORK/parts/PARTS.sha256"
        if [[ ${#bad[@]} -gt 0 ]]; then
            rm -f "${bad[@]/#/$WORK/parts/}"
            die "data: part(s) ${bad[*]} do not match PARTS.sha256 (removed from $WORK/parts; send again)"
        fi
        if [[ ${#missing[@]} -gt 0 ]]; then
            local total
            total=$(wc -l < "$WORK/parts/PARTS.sha256")
            log "data: waiting for parts: have $((total - ${#missing[@]})) of $total, missing ${missing[*]}"
            exit 3
        fi
        local list=()
        while read -r want part; do list+=("$WORK/parts/${part#\*}"); done < "$WORK/parts/PARTS.sha256"
        cat "${list[@]}" > "$ZIP_DEST.tmp"
        mv "$ZIP_DEST.tmp" "$ZIP_DEST"
        name="$(cat "$WORK/parts/PARTS.name" 2>/dev/null || echo tiny-imagenet-200-sub.zip)"
        log "data: joined ${#list[@]} parts into $ZIP_DEST"
    fi
    sums="$(find_sums)"
    if [[ -n "$sums" ]]; then
        EXPECTED="$(expected_sha "$sums" "$name")"
        local got
        got="$(sha_of "$ZIP_DEST")"
        if [[ "$got" != "$EXPECTED" ]]; then
            rm -f "$ZIP_DEST"
            die "data: sha256 of the joined zip is $got, $sums says $EXPECTED for $name"
        fi
        log "data: sha256 $got matches $sums"
    else
        log "data: no SHA256SUMS found: the zip is used unchecked"
    fi
    echo "$name $(sha_of "$ZIP_DEST")" > "$WORK/state/data.ok"
    phase_mark data $((SECONDS - start))
}

# ----------------------------------------------------------------------------------------------------------
# 2. cache

prepare_step() {
    local start=$SECONDS
    local check="import sys; from tinyswin.data import is_cache; sys.exit(0 if is_cache(sys.argv[1]) else 1)"
    if "$PY" -c "$check" "$WORK/cache"; then
        log "cache: $WORK/cache ready"
        return
    fi
    log "cache: preparing $WORK/cache"
    "$PY" -m tinyswin prepare "$ZIP_DEST" --out "$WORK/cache" --quiet
    phase_mark prepare $((SECONDS - start))
}

# ----------------------------------------------------------------------------------------------------------
# 3. train (with the budget; resumed across calls)

EVAL_RESERVE=45  # seconds kept for evaluation and the summary after training stops

train_step() {
    local start=$SECONDS run="$WORK/run"
    if [[ -f "$run/summary.json" ]]; then
        log "train: $run finished"
        return
    fi
    local left=$(( CALL_LIMIT - (SECONDS - CALL_START) - EVAL_RESERVE ))
    if (( left < 30 )); then
        log "train: only ${left}s left in this call; call again to continue"
        exit 75
    fi
    local cmd=("$PY" -m tinyswin train --out "$run" --quiet)
    if [[ -f "$run/last.pt" ]]; then
        log "train: resuming $run (${left}s in this call)"
        cmd+=(--resume)
    else
        rm -rf "$run"
        log "train: preset $PRESET, budget ${BUDGET}s (${left}s in this call) ${OVERRIDES[*]:-}"
        cmd+=(--data "$WORK/cache" --preset "$PRESET" --time-budget "$BUDGET")
        cmd+=(${OVERRIDES[@]+"${OVERRIDES[@]}"})
    fi
    local rc=0
    timeout --signal=TERM --kill-after=15 "$left" "${cmd[@]}" || rc=$?
    phase_mark train $((SECONDS - start))
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then
        log "train: stopped at this call's limit; call again to resume from $run/last.pt"
        exit 75
    fi
    [[ $rc -eq 0 ]] || die "train failed (exit $rc); see $LOG"
}

# ----------------------------------------------------------------------------------------------------------
# 4. evaluate and summarize

eval_step() {
    local start=$SECONDS run="$WORK/run"
    for which in best last; do
        [[ -f "$WORK/state/eval_$which.json" ]] && continue
        "$PY" -m tinyswin eval "$run/$which.pt" --data "$WORK/cache" --json \
            > "$WORK/state/eval_$which.json.tmp"
        mv "$WORK/state/eval_$which.json.tmp" "$WORK/state/eval_$which.json"
        if "$PY" - "$run/config.yaml" <<'PY'
import sys, yaml
sys.exit(0 if (yaml.safe_load(open(sys.argv[1])) or {}).get("ema", {}).get("enabled") else 1)
PY
        then
            "$PY" -m tinyswin eval "$run/$which.pt" --data "$WORK/cache" --ema --json \
                > "$WORK/state/eval_${which}_ema.json.tmp"
            mv "$WORK/state/eval_${which}_ema.json.tmp" "$WORK/state/eval_${which}_ema.json"
        fi
    done
    phase_mark eval $((SECONDS - start))
}

summary_step() {
    local run="$WORK/run"
    "$PY" - "$WORK" "$OUT_DIR" "$PRESET" "$BUDGET" "$ROOT" <<'PY'
import json, shutil, subprocess, sys, time
from pathlib import Path

work, out, preset, root = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[5]
budget = float(sys.argv[4])
run, state = work / "run", work / "state"
import torch

def read(path):
    return json.loads(path.read_text()) if path.exists() else None

def git(*args):
    try:
        done = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, check=True)
        return done.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None

phases = {}
for line in (state / "phases").read_text().splitlines() if (state / "phases").exists() else []:
    name, seconds = line.split()
    phases[name] = phases.get(name, 0) + int(seconds)
train = read(run / "summary.json") or {}
train.pop("val_details", None)
meta = read(work / "cache" / "meta.json") or {}
counts = meta.get("counts", {})
data_name, data_sha = (state / "data.ok").read_text().split()
summary = {
    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    "torch": torch.__version__,
    "commit": git("rev-parse", "HEAD"),
    "tree_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "data": {
        "zip": data_name,
        "sha256": data_sha,
        "splits": counts,
        "note": "the shared subset holds 250 train images per class (half the official training set) and "
        "10 val images per class (the official val has 50)",
    },
    "preset": preset,
    "budget_s": budget,
    "train": train,
    "eval": {name: read(state / f"eval_{name}.json") for name in ("best", "last", "best_ema", "last_ema")},
    "phase_seconds": phases,
}
(out / "speedrun.json").write_text(json.dumps(summary, indent=2) + "\n")
for name in ("config.yaml", "metrics.jsonl"):
    if (run / name).exists():
        shutil.copy(run / name, out / name)
for png in sorted((run / "plots").glob("*.png"))[:3]:
    shutil.copy(png, out / png.name)
if (state / "throughput.json").exists():
    shutil.copy(state / "throughput.json", out / "throughput.json")
    summary["throughput"] = read(state / "throughput.json")
    (out / "speedrun.json").write_text(json.dumps(summary, indent=2) + "\n")
t = summary["train"]
print(
    f"gpu_speedrun: {summary['device']}: val top-1 {100 * t.get('val_top1', float('nan')):.2f}% "
    f"top-5 {100 * t.get('val_top5', float('nan')):.2f}% after {t.get('epochs')} epochs, "
    f"{t.get('train_seconds', float('nan')):.0f} s of training, "
    f"{t.get('images_per_s', float('nan')):.0f} img/s"
)
PY
}

stop_after() {
    if [[ "$UNTIL" == "$1" ]]; then
        log "stopping after '$1' (--until)"
        exit 0
    fi
}

throughput_step() {
    [[ $THROUGHPUT -eq 1 && ! -f "$WORK/state/throughput.json" ]] || return 0
    local start=$SECONDS
    "$PY" "$ROOT/benchmarks/gpu_throughput.py" --data "$WORK/cache" --json "$WORK/state/throughput.json.tmp"
    mv "$WORK/state/throughput.json.tmp" "$WORK/state/throughput.json"
    phase_mark throughput $((SECONDS - start))
}

data_step
stop_after data
prepare_step
stop_after prepare
throughput_step
train_step
stop_after train
eval_step
summary_step
log "done: $OUT_DIR/speedrun.json"
