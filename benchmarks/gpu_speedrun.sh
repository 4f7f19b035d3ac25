#!/usr/bin/env bash
# Tiny ImageNet speedrun on one GPU: join the data parts, check the sha256s, prepare the cache (several zips are
# extracted over each other into one folder first: the shared data is tiny-imagenet-200-sub.zip, then
# tiny-imagenet-200-train-rest.zip), train a preset within a time budget (resuming across calls), evaluate with
# and without the test-time flip, and write a JSON summary and the plots.
#
# Made for a GPU machine where one command may run at most 10 minutes and files arrive in parts of at most
# 64 MiB. Every step is idempotent and keeps its state in the work folder, so the same command, called again,
# continues where the last call stopped. Exit status: 0 done (summary written), 75 call again (the training
# stopped at this call's time limit and resumes next call), 3 waiting for data parts, 1 or 2 an error.
#
# On the machine that has the zips, cut them into parts (one folder per zip, each with a manifest of its
# parts' sha256 and its SHA256SUMS line; DEST/ZIPS lists the zips, in the order they are extracted):
#     benchmarks/gpu_speedrun.sh split ../shared/data/tiny-imagenet-200-sub.zip \
#         ../shared/data/tiny-imagenet-200-train-rest.zip runs/parts --part-size 60M
# (benchmarks/gpu_plan.py does this and lays the parts out one folder per device call, printing the calls in
# order with their sizes: benchmarks/gpu_plan.md.)
# On the GPU machine, from the repository root, as often as needed (parts may arrive over several calls; each
# call copies the parts it finds into the work folder and waits until every zip ZIPS lists is complete):
#     benchmarks/gpu_speedrun.sh --parts runs/parts --out "$OUT"
# With --warm-cache --background the first call also starts compiling the preset's training step and
# evaluation on synthetic data of the run's shapes, detached, into the inductor cache (WORK/inductor-cache,
# TORCHINDUCTOR_CACHE_DIR): the calls that bring the data overlap the compilation, and the training reads the
# compiled kernels from the cache instead of compiling (it waits for a fill still running).
# Before a GPU session, the whole script on a tiny generated dataset on the CPU (a few minutes; nothing kept):
#     benchmarks/gpu_speedrun.sh --cpu-smoke
#
# The budget is the trainer's own clock (`train_seconds` in its summary: evaluation included, compilation and
# warm-up left out and reported as `compile_seconds`, carried across resumes); an epoch cut short by a call's
# limit is redone after the resume and not counted. Compiled kernels go to WORK/inductor-cache
# (TORCHINDUCTOR_CACHE_DIR, unless set): a resumed run, and every later call, reads them instead of compiling
# again; a run stopped while compiling says so and writes nothing.
#
# Options (defaults in brackets):
#     --parts DIR       folder where parts arrive: DIR/<zip>/part-* with PARTS.sha256, PARTS.name and
#                       SHA256SUMS per zip, and DIR/ZIPS (or one zip's parts in DIR itself); may repeat
#                       [runs/parts]
#     --zip FILE        a whole zip instead of parts; may repeat (extracted in the order given; sha256s
#                       checked where a SHA256SUMS beside it names them)
#     --sums FILE       a SHA256SUMS file (sha256sum format) naming the zips [SHA256SUMS beside the parts]
#     --work DIR        persistent work folder: parts, joined zips, cache, run directory [runs/speedrun]
#     --out DIR         where the summary and plots go (at most 8 files) [$OUT, else WORK/out]
#     --preset NAME     training preset [speedrun]
#     --budget SECONDS  training time budget, counted by the trainer across resumes [300: the 5-minute goal]
#     --call-limit S    seconds this call may use in all; training stops in time for the evaluation [570]
#     --python PY       Python with torch [.venv/bin/python if present, else python3]
#     --throughput      also time train steps and the augmentation, data resident vs the notebook's
#                       DataLoader (gpu_throughput.py: the preset's model and augmentation, batch 512 and
#                       1024, compiled), once, into throughput.json
#     --until STEP      stop after this step: data, prepare, train (e.g. a call that only takes in parts)
#     --warm-cache      first compile the preset's training step and evaluation (benchmarks/compile_time.py,
#                       synthetic data of the run's shapes: the preset's batches, 200 classes, 64px, the
#                       overrides) into the inductor cache, once; its seconds go to the summary
#     --background      with --warm-cache: compile detached (setsid), so that this call returns at once
#     --cpu-smoke       run the whole script on the CPU on two tiny generated zips sent as parts (a small
#                       model, a 40 s budget, gpu_throughput.py --quick) in a temporary folder, and check
#                       the summary's fields: the check to run before a GPU session
#     -- key=value ...  config overrides for a new run (e.g. compile=true batch_size=1024)
#
# Outputs in --out: speedrun.json (card, versions, commit, data, preset, budget; top-1/top-5 on val with and
# without the test-time flip, raw and EMA weights, from the run's summary and from `tinyswin eval` of best.pt
# and last.pt; images/s, compile seconds, training seconds, wall seconds; the run's summary; seconds per
# phase), config.yaml, metrics.jsonl, loss.png, accuracy.png, lr.png, speedrun.log, and throughput.json with
# --throughput: 8 files.
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

split_one() {  # split_one ZIP DEST SIZE: parts of one zip, its manifest and its SHA256SUMS line in DEST
    local zip="$1" dest="$2" size="$3" name sums want
    [[ -f "$zip" ]] || die "split: zip not found: $zip"
    name="$(basename "$zip")"
    mkdir -p "$dest"
    rm -f "$dest"/part-*
    split -b "$size" -d -a 3 "$zip" "$dest/part-"
    (cd "$dest" && sha256sum part-* > PARTS.sha256 && echo "$name" > PARTS.name)
    sums="$(dirname "$zip")/SHA256SUMS"
    if [[ -f "$sums" ]]; then  # the published checksum travels with the parts, checked here first
        want="$(expected_sha "$sums" "$name")"
        [[ "$(sha_of "$zip")" == "$want" ]] || die "split: $zip does not match its $sums"
        grep -E "[ *]$name\$" "$sums" > "$dest/SHA256SUMS"
    else
        echo "$(sha_of "$zip")  $name" > "$dest/SHA256SUMS"
    fi
    log "$(ls "$dest"/part-* | wc -l) parts of $name (at most $size) in $dest"
}

cmd_split() {
    local args=() size="60M"
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --part-size) size="$2"; shift 2 ;;
            -*) die "split: unknown option $1" ;;
            *) args+=("$1"); shift ;;
        esac
    done
    [[ ${#args[@]} -ge 2 ]] || die "split: usage: gpu_speedrun.sh split ZIP [ZIP...] DEST_DIR [--part-size 60M]"
    local dest="${args[-1]}" zip names=()
    unset 'args[-1]'
    mkdir -p "$dest"
    for zip in "${args[@]}"; do
        split_one "$zip" "$dest/$(basename "$zip" .zip)" "$size"
        names+=("$(basename "$zip")")
    done
    printf '%s\n' "${names[@]}" > "$dest/ZIPS"  # the zips, in the order they are extracted
    log "DEST/ZIPS lists ${#names[@]} zip(s): ${names[*]}"
}

if [[ "${1:-}" == "split" ]]; then
    shift
    cmd_split "$@"
    exit 0
fi

# ----------------------------------------------------------------------------------------------------------
# --cpu-smoke: the whole script on two tiny generated zips, on the CPU

cpu_smoke() {
    local tmp py rc=0
    tmp="$(mktemp -d "${TMPDIR:-/tmp}/speedrun-smoke.XXXXXX")"
    py="${PY:-}"
    if [[ -z "$py" ]]; then
        if [[ -x "$ROOT/.venv/bin/python" ]]; then py="$ROOT/.venv/bin/python"; else py="python3"; fi
    fi
    log "cpu smoke: in $tmp"
    PYTHONPATH="$ROOT/src" "$py" - "$tmp/src" <<'PY'
import io, sys, zipfile
from pathlib import Path
import numpy as np
from PIL import Image

out = Path(sys.argv[1]); out.mkdir(parents=True)
rng = np.random.default_rng(0)
wnids = [f"n0000000{k}" for k in range(4)]
def jpeg(k):  # a class-dependent colour and stripes, plus noise
    img = np.zeros((32, 32, 3)) + 60 + 45 * k
    img[:, :: 2 + k] += 60
    img += rng.normal(0, 12, img.shape)
    buf = io.BytesIO(); Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG"); return buf.getvalue()
root = "tiny-imagenet-200"
with zipfile.ZipFile(out / "tiny-imagenet-200-sub.zip", "w") as sub, zipfile.ZipFile(out / "tiny-imagenet-200-train-rest.zip", "w") as rest:
    sub.writestr(f"{root}/wnids.txt", "\n".join(wnids) + "\n")
    sub.writestr(f"{root}/words.txt", "".join(f"{w}\tthing {k}\n" for k, w in enumerate(wnids)))
    ann = []
    for k, w in enumerate(wnids):
        for i in range(24):
            (sub if i < 12 else rest).writestr(f"{root}/train/{w}/images/{w}_{i}.JPEG", jpeg(k))
        rest.writestr(f"{root}/train/{w}/{w}_boxes.txt", "".join(f"{w}_{i}.JPEG\t0\t0\t31\t31\n" for i in range(24)))
        for i in range(4):
            name = f"val_{4 * k + i}.JPEG"
            sub.writestr(f"{root}/val/images/{name}", jpeg(k)); ann.append(f"{name}\t{w}\t0\t0\t31\t31\n")
    sub.writestr(f"{root}/val/val_annotations.txt", "".join(ann))
PY
    bash "${BASH_SOURCE[0]}" split "$tmp/src/tiny-imagenet-200-sub.zip" "$tmp/src/tiny-imagenet-200-train-rest.zip" \
        "$tmp/parts" --part-size 40K
    local args=(--parts "$tmp/parts" --work "$tmp/work" --out "$tmp/out" --budget 40 --call-limit 400 --python "$py"
        --throughput --warm-cache --background -- device=cpu threads=1 compile=false model.preset=nano model.embed_dim=16
        "model.depths=[1, 1]" "model.num_heads=[1, 2]" model.window_size=4 batch_size=16 eval_batch_size=16
        schedule.epochs=3 schedule.warmup_epochs=1 schedule.mix_off_last_epochs=1)
    for _ in 1 2 3; do  # 75: call again (as on the GPU machine)
        rc=0
        SPEEDRUN_THROUGHPUT_ARGS="--quick" bash "${BASH_SOURCE[0]}" "${args[@]}" || rc=$?
        [[ $rc -eq 75 ]] || break
    done
    [[ $rc -eq 0 ]] || die "cpu smoke: the run ended with exit status $rc (kept: $tmp)"
    "$py" - "$tmp/out" <<'PY' || die "cpu smoke: the summary is incomplete (kept: $tmp)"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
s = json.loads((out / "speedrun.json").read_text())
need = ["device", "commit", "images_per_s", "compile_seconds", "train_seconds", "wall_seconds", "results", "eval"]
missing = [k for k in need if k not in s]
missing += [f"results.{k}" for k in ("val_top1", "val_top5", "val_top1_no_tta", "val_top5_no_tta", "ema_val_top1",
            "ema_val_top1_no_tta") if s["results"].get(k) is None]
missing += [f"eval.{w}.top1_no_tta" for w in ("best", "last", "best_ema", "last_ema")
            if (s["eval"].get(w) or {}).get("top1_no_tta") is None]
missing += [f for f in ("config.yaml", "metrics.jsonl", "loss.png", "accuracy.png", "lr.png", "speedrun.log", "throughput.json") if not (out / f).is_file()]
missing += [] if (s.get("warm_cache") or {}).get("warm_up_s") is not None else ["warm_cache.warm_up_s"]
if missing:
    sys.exit(f"cpu smoke: missing {missing}")
print(f"cpu smoke: speedrun.json complete; compile_seconds {s['compile_seconds']}; {len(list(out.iterdir()))} files")
PY
    rm -rf "$tmp"
    log "cpu smoke: ok"
}

# ----------------------------------------------------------------------------------------------------------
# options

PARTS_DIRS=()
ZIPS=()
SUMS=""
WORK="runs/speedrun"
OUT_DIR="${OUT:-}"
PRESET="speedrun"
BUDGET=300
CALL_LIMIT=570
PY=""
THROUGHPUT=0
WARM_CACHE=0
BACKGROUND=0
UNTIL=""
OVERRIDES=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --parts) PARTS_DIRS+=("$2"); shift 2 ;;
        --zip) ZIPS+=("$2"); shift 2 ;;
        --sums) SUMS="$2"; shift 2 ;;
        --work) WORK="$2"; shift 2 ;;
        --out) OUT_DIR="$2"; shift 2 ;;
        --preset) PRESET="$2"; shift 2 ;;
        --budget) BUDGET="$2"; shift 2 ;;
        --call-limit) CALL_LIMIT="$2"; shift 2 ;;
        --python) PY="$2"; shift 2 ;;
        --throughput) THROUGHPUT=1; shift ;;
        --warm-cache) WARM_CACHE=1; shift ;;
        --background) BACKGROUND=1; shift ;;
        --until) UNTIL="$2"; shift 2 ;;
        --cpu-smoke) cpu_smoke; exit 0 ;;
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
mkdir -p "$OUT_DIR" "$WORK/parts" "$WORK/zips" "$WORK/state"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
LOG="$WORK/state/speedrun.log"  # every call's output, copied to --out when a call ends
exec > >(tee -a "$LOG") 2>&1
EXTRACT=""  # the folder several zips are extracted into (in memory when it can be), removed on exit
trap 'sleep 0.2; cp "$LOG" "$OUT_DIR/speedrun.log" 2>/dev/null || true; [[ -z "$EXTRACT" ]] || rm -rf "$EXTRACT"' EXIT
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$WORK/inductor-cache}"  # compiled once, read after
log "call started $(date -u +%FT%TZ); work $WORK; out $OUT_DIR; python $PY"

phase_mark() {  # phase_mark NAME SECONDS: add this call's seconds of a phase to the state
    echo "$1 $2" >> "$WORK/state/phases"
}

# ----------------------------------------------------------------------------------------------------------
# 1. data: collect parts, join, check

ZIP_DIR="$WORK/zips"

sums_for() {  # sums_for DIR ZIP_NAME: the SHA256SUMS file that names the zip (--sums, DIR's, or none)
    local f
    for f in "$SUMS" "$1/SHA256SUMS" "$WORK/parts/SHA256SUMS"; do
        [[ -n "$f" && -f "$f" ]] && grep -qE "[ *]$2\$" "$f" && { echo "$f"; return; }
    done
    return 0
}

check_zip() {  # check_zip ZIP SUMS_FILE: the zip's sha256 against the file's line (removed if wrong)
    local zip="$1" sums="$2" name want got
    name="$(basename "$zip")"
    got="$(sha_of "$zip")"
    if [[ -n "$sums" ]]; then
        want="$(expected_sha "$sums" "$name")"
        if [[ "$got" != "$want" ]]; then
            rm -f "$zip"
            die "data: sha256 of $name is $got, $sums says $want"
        fi
        log "data: $name sha256 $got matches $sums"
    else
        log "data: no SHA256SUMS names $name: used unchecked"
    fi
    echo "$name $got" >> "$WORK/state/data.ok.tmp"
}

collect_parts() {  # copy the parts and manifests that arrived: DIR/ZIPS, DIR/<zip>/*, or one zip's in DIR
    local d src f kept
    for d in "${PARTS_DIRS[@]}"; do
        [[ -d "$d" ]] || continue
        [[ -f "$d/ZIPS" ]] && cp "$d/ZIPS" "$WORK/parts/ZIPS"
        for src in "$d" "$d"/*/; do
            src="${src%/}"
            [[ -d "$src" ]] || continue
            local target="$WORK/parts/$( [[ "$src" == "$d" ]] && echo _ || basename "$src")"
            for f in "$src"/part-* "$src"/PARTS.sha256 "$src"/PARTS.name "$src"/SHA256SUMS; do
                [[ -f "$f" ]] || continue
                mkdir -p "$target"
                kept="$target/$(basename "$f")"
                if [[ ! -f "$kept" ]] || ! cmp -s "$f" "$kept"; then
                    cp "$f" "$kept.tmp" && mv "$kept.tmp" "$kept"
                fi
            done
        done
    done
}

join_parts() {  # join_parts DIR: the zip of one folder of parts, checked part by part; exit 3 while incomplete
    local dir="$1" name missing=() bad=() part want list=() total
    [[ -f "$dir/PARTS.sha256" ]] || { log "data: waiting for parts: no PARTS.sha256 in $dir yet"; exit 3; }
    name="$(cat "$dir/PARTS.name" 2>/dev/null || echo tiny-imagenet-200-sub.zip)"
    while read -r want part; do
        part="${part#\*}"
        if [[ ! -f "$dir/$part" ]]; then
            missing+=("$part")
        elif [[ "$(sha_of "$dir/$part")" != "$want" ]]; then
            bad+=("$part")
        fi
        list+=("$dir/$part")
    done < "$dir/PARTS.sha256"
    if [[ ${#bad[@]} -gt 0 ]]; then
        rm -f "${bad[@]/#/$dir/}"
        die "data: part(s) ${bad[*]} do not match PARTS.sha256 of $name (removed from $dir; send again)"
    fi
    if [[ ${#missing[@]} -gt 0 ]]; then
        total=$(wc -l < "$dir/PARTS.sha256")
        log "data: waiting for parts of $name: have $((total - ${#missing[@]})) of $total, missing ${missing[*]}"
        exit 3
    fi
    cat "${list[@]}" > "$ZIP_DIR/$name.tmp"
    mv "$ZIP_DIR/$name.tmp" "$ZIP_DIR/$name"
    log "data: joined ${#list[@]} parts into $ZIP_DIR/$name"
    check_zip "$ZIP_DIR/$name" "$(sums_for "$dir" "$name")"
}

data_step() {
    local start=$SECONDS zip dir name
    if [[ -f "$WORK/state/data.ok" ]]; then
        log "data: $(cut -d' ' -f1 "$WORK/state/data.ok" | tr '\n' ' ')already checked"
        return
    fi
    rm -f "$WORK/state/data.ok.tmp"
    if [[ ${#ZIPS[@]} -gt 0 ]]; then
        for zip in "${ZIPS[@]}"; do
            [[ -f "$zip" ]] || die "--zip not found: $zip"
            cp "$zip" "$ZIP_DIR/$(basename "$zip").tmp" && mv "$ZIP_DIR/$(basename "$zip").tmp" "$ZIP_DIR/$(basename "$zip")"
            check_zip "$ZIP_DIR/$(basename "$zip")" "$(sums_for "$(dirname "$zip")" "$(basename "$zip")")"
        done
    else
        collect_parts
        local dirs=()
        if [[ -f "$WORK/parts/ZIPS" ]]; then  # every zip the sender split, in its order
            while read -r name; do
                [[ -n "$name" ]] || continue
                dir="$(grep -lx "$name" "$WORK"/parts/*/PARTS.name 2>/dev/null | head -n1 || true)"
                [[ -n "$dir" ]] || { log "data: waiting for parts: none of $name yet (ZIPS lists it)"; exit 3; }
                dirs+=("$(dirname "$dir")")
            done < "$WORK/parts/ZIPS"
        else
            for dir in "$WORK"/parts/*/; do [[ -f "$dir/PARTS.sha256" ]] && dirs+=("${dir%/}"); done
        fi
        [[ ${#dirs[@]} -gt 0 ]] || {
            log "data: waiting for parts: no PARTS.sha256 manifest yet in ${PARTS_DIRS[*]} ('split' makes it)"
            exit 3
        }
        for dir in "${dirs[@]}"; do join_parts "$dir"; done
    fi
    mv "$WORK/state/data.ok.tmp" "$WORK/state/data.ok"
    phase_mark data $((SECONDS - start))
}

# ----------------------------------------------------------------------------------------------------------
# 2. cache

prepare_step() {
    local start=$SECONDS source
    local check="import sys; from tinyswin.data import is_cache; sys.exit(0 if is_cache(sys.argv[1]) else 1)"
    if "$PY" -c "$check" "$WORK/cache"; then
        log "cache: $WORK/cache ready"
        return
    fi
    mapfile -t names < <(cut -d' ' -f1 "$WORK/state/data.ok")
    if [[ ${#names[@]} -eq 1 ]]; then
        source="$ZIP_DIR/${names[0]}"
    else  # several zips: extracted over each other, in order, into one folder (the official layout)
        extract_dir
        source="$("$PY" - "$EXTRACT" "${names[@]/#/$ZIP_DIR/}" <<'PY'
import sys, zipfile
from pathlib import Path
dest = Path(sys.argv[1])
for zip_path in sys.argv[2:]:
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(dest)
roots = sorted(p.parent for p in dest.glob("*/wnids.txt")) or sorted(p.parent for p in dest.glob("wnids.txt"))
print(roots[0] if roots else dest)
PY
)"
        log "cache: extracted ${names[*]} into $source"
    fi
    log "cache: preparing $WORK/cache from $source"
    "$PY" -m tinyswin prepare "$source" --out "$WORK/cache" --quiet
    [[ -z "$EXTRACT" ]] || rm -rf "$EXTRACT"
    EXTRACT=""
    phase_mark prepare $((SECONDS - start))
}

extract_dir() {  # EXTRACT: a fresh folder in /dev/shm when it has room for twice the zips, else in WORK
    local need_kb free_kb
    need_kb=$(( $(du -cb "$ZIP_DIR"/*.zip | tail -n 1 | cut -f1) / 512 ))  # twice their size, in KiB
    free_kb=$(df -Pk /dev/shm 2>/dev/null | awk 'NR == 2 {print $4}' || true)
    rm -rf "$WORK/extract"
    if [[ -w /dev/shm && "${free_kb:-0}" -gt "$need_kb" ]]; then  # 100,000 small files: minutes on a disk
        EXTRACT="$(mktemp -d /dev/shm/speedrun-extract.XXXXXX)"
    else
        EXTRACT="$WORK/extract"
    fi
}

# ----------------------------------------------------------------------------------------------------------
# 3. train (with the budget; resumed across calls)

# ----------------------------------------------------------------------------------------------------------
# 0. warm cache: the preset's graphs compiled into the inductor cache before the data is there

WARM_PID="$WORK/state/warm-cache.pid"

warm_cache_running() {
    [[ -f "$WARM_PID" ]] && kill -0 "$(cat "$WARM_PID")" 2>/dev/null
}

warm_cache_step() {
    [[ $WARM_CACHE -eq 1 ]] || return 0
    if [[ -f "$WORK/state/warm-cache.json" ]]; then
        log "warm cache: filled already ($TORCHINDUCTOR_CACHE_DIR)"
        return
    fi
    if warm_cache_running; then
        log "warm cache: still compiling (pid $(cat "$WARM_PID"))"
        return
    fi
    "$PY" -c 'import torch; print("gpu_speedrun: torch", torch.__version__, "on",
        torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (no CUDA)")'
    local cmd=("$PY" "$ROOT/benchmarks/compile_time.py" --preset "$PRESET" --steps 1
        --json "$WORK/state/warm-cache.json" ${OVERRIDES[@]+"${OVERRIDES[@]}"})
    if [[ $BACKGROUND -eq 1 ]]; then
        setsid nohup "${cmd[@]}" > "$WORK/state/warm-cache.log" 2>&1 < /dev/null &
        echo $! > "$WARM_PID"
        log "warm cache: compiling in the background (pid $!) into $TORCHINDUCTOR_CACHE_DIR; log $WORK/state/warm-cache.log"
        return
    fi
    local start=$SECONDS
    "${cmd[@]}" || die "warm cache: compile_time.py failed; see $LOG"
    phase_mark warm_cache $((SECONDS - start))
}

wait_for_warm_cache() {  # before training: a fill still compiling is waited for, then read from the cache
    warm_cache_running || return 0
    local start=$SECONDS
    log "train: waiting for the warm cache to finish compiling (pid $(cat "$WARM_PID"))"
    while warm_cache_running; do sleep 1; done
    phase_mark warm_cache_wait $((SECONDS - start))
    if [[ -f "$WORK/state/warm-cache.json" ]]; then
        tail -n 1 "$WORK/state/warm-cache.log"
    else  # its output goes into this log, which comes back
        log "train: the warm cache failed, the training compiles cold; the end of its log:"
        tail -n 30 "$WORK/state/warm-cache.log" 2>/dev/null || true
    fi
}

EVAL_RESERVE=45  # seconds kept for evaluation and the summary after training stops

train_step() {
    local start=$SECONDS run="$WORK/run"
    if [[ -f "$run/summary.json" ]]; then
        log "train: $run finished"
        return
    fi
    wait_for_warm_cache
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
    if [[ $rc -eq 124 || $rc -eq 137 || $rc -eq 143 ]]; then
        log "train: stopped at this call's limit; call again to resume from $run/last.pt"
        exit 75
    fi
    [[ $rc -eq 0 ]] || die "train failed (exit $rc); see $LOG"
}

# ----------------------------------------------------------------------------------------------------------
# 4. evaluate (with and without the test-time flip) and summarize

eval_step() {  # best.pt and last.pt, raw and EMA weights, with and without the flip: one process
    local start=$SECONDS
    "$PY" - "$WORK/run" "$WORK/cache" "$WORK/state" <<'PY' || die "eval failed; see $LOG"
import json, sys
from pathlib import Path
import yaml
from tinyswin.evaluate import evaluate_checkpoint

run, cache, state = (Path(a) for a in sys.argv[1:4])
ema = bool((yaml.safe_load((run / "config.yaml").read_text()) or {}).get("ema", {}).get("enabled"))
for which in ("best", "last"):
    for suffix, use_ema in (("", False), ("_ema", True)):
        out = state / f"eval_{which}{suffix}.json"
        if out.exists() or (use_ema and not ema):
            continue
        result = evaluate_checkpoint(run / f"{which}.pt", data=str(cache), ema=use_ema, tta="flip",
                                     log=lambda _m: None, progress=False)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result) + "\n")
        tmp.replace(out)
        print(f"gpu_speedrun: eval {which}{suffix}: top-1 {100 * result['top1']:.2f}% "
              f"(without the flip {100 * result['top1_no_tta']:.2f}%)", flush=True)
PY
    phase_mark eval $((SECONDS - start))
}

summary_step() {
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
zips = [dict(zip(("zip", "sha256"), line.split())) for line in (state / "data.ok").read_text().splitlines()]
keys = ("val_top1", "val_top5", "val_top1_no_tta", "val_top5_no_tta",
        "ema_val_top1", "ema_val_top5", "ema_val_top1_no_tta", "ema_val_top5_no_tta")
summary = {
    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    "torch": torch.__version__,
    "commit": git("rev-parse", "HEAD"),
    "tree_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "data": {"zips": zips, "splits": meta.get("counts", {})},
    "preset": preset,
    "budget_s": budget,
    "results": {"tta": train.get("tta"), **{k: train.get(k) for k in keys},
                "best_top1": train.get("best_top1"), "best_epoch": train.get("best_epoch"),
                "epochs": train.get("epochs")},
    "images_per_s": train.get("images_per_s"),
    "compile_seconds": train.get("compile_seconds"),
    "train_seconds": train.get("train_seconds"),
    "wall_seconds": sum(phases.values()),
    "eval": {name: read(state / f"eval_{name}.json") for name in ("best", "last", "best_ema", "last_ema")},
    "warm_cache": read(state / "warm-cache.json"),  # the compilation done before the data (--warm-cache)
    "train": train,
    "phase_seconds": phases,
}
for name in ("config.yaml", "metrics.jsonl"):
    if (run / name).exists():
        shutil.copy(run / name, out / name)
for png in sorted((run / "plots").glob("*.png"))[:3]:
    shutil.copy(png, out / png.name)
if (state / "throughput.json").exists():
    shutil.copy(state / "throughput.json", out / "throughput.json")
    summary["throughput"] = read(state / "throughput.json")
(out / "speedrun.json").write_text(json.dumps(summary, indent=2) + "\n")
r = summary["results"]
pct = lambda v: "n/a" if v is None else f"{100 * v:.2f}%"
num = lambda v, f="{:.0f}": "n/a" if v is None else f.format(v)
print(
    f"gpu_speedrun: {summary['device']}: val top-1 {pct(r['val_top1'])} (without the flip {pct(r['val_top1_no_tta'])}), "
    f"top-5 {pct(r['val_top5'])}; EMA top-1 {pct(r['ema_val_top1'])} (without {pct(r['ema_val_top1_no_tta'])}); "
    f"{r['epochs']} epochs, {num(summary['images_per_s'])} img/s, compile {num(summary['compile_seconds'], '{:.1f}')} s, "
    f"training {num(summary['train_seconds'])} s, wall {summary['wall_seconds']} s"
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
    # shellcheck disable=SC2086  # extra options, split on spaces (the CPU smoke's --quick)
    "$PY" "$ROOT/benchmarks/gpu_throughput.py" --data "$WORK/cache" --preset "$PRESET" \
        ${SPEEDRUN_THROUGHPUT_ARGS:-} --json "$WORK/state/throughput.json.tmp"
    mv "$WORK/state/throughput.json.tmp" "$WORK/state/throughput.json"
    phase_mark throughput $((SECONDS - start))
}

warm_cache_step
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
