#!/bin/bash
# Submit the EVEREST production run to SLURM: the training array job, then the analysis job.
#
#   cluster/slurm/submit_jobs.sh --dry-run            # print the commands, submit nothing
#   cluster/slurm/submit_jobs.sh --targets M-48 C-24 --seeds 0 1
#   cluster/slurm/submit_jobs.sh --unfinished         # resubmit what has no results yet
#   cluster/slurm/submit_jobs.sh --group-width 5      # 9 tasks of 5 experiments, one GPU each
#   cluster/slurm/submit_jobs.sh -h
#
# Only the SLURM-specific rendering is here; parsing, validation and the submission sequence are in
# cluster/lib.sh, site settings in cluster/site.sh. The PBS Pro version is cluster/submit_jobs.sh.
#
# SLURM arrays take a list (--array=1-2,21-22), so the task id is the experiment index itself: no
# index list file (with --group-width W > 1: --array=1-G over the lines of one, as on PBS Pro). The analysis waits with --dependency=afterany:<id>: it starts when every task has
# ended, failed ones included, so its report lists the failures. `--depend afterok` instead starts it
# only when all tasks succeeded; after a failure SLURM cancels it (--kill-on-invalid-dep=yes).
set -uo pipefail

EVEREST_CLUSTER_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd) || exit 1
export EVEREST_CLUSTER_DIR
# shellcheck source=cluster/lib.sh
source "$EVEREST_CLUSTER_DIR/lib.sh" || exit 1
# shellcheck source=cluster/site.sh
source "$EVEREST_CLUSTER_DIR/site.sh" || exit 1

SLURM_DIR=$EVEREST_CLUSTER_DIR/slurm

backend_name() { echo "SLURM"; }

# Groups (--group-width W > 1) run over the lines of an index list, as on PBS Pro: task K trains the
# indices on line K. One experiment per task needs no list: the task id is the experiment index.
backend_uses_index_file() { ((SUBMIT_GROUP_WIDTH > 1)); }

backend_min_array_size() { echo 1; }

# 1 2 3 7 9 10 -> 1-3,7,9-10 (sorted input)
_slurm_ranges() {
    local out="" start="" prev="" k
    for k in "$@" ""; do
        if [[ -n $prev && $k == $((prev + 1)) ]]; then
            prev=$k
            continue
        fi
        if [[ -n $start ]]; then
            out+="${out:+,}$start"
            ((prev > start)) && out+="-$prev"
        fi
        start=$k
        prev=$k
    done
    printf '%s' "$out"
}

# Partition, account and resource overrides, then the script, into SCHED_OPTS.
#   _slurm_options SCRIPT CPUS MEM WALLTIME GPU_TYPE [QUEUE]
_slurm_options() {
    local queue=${6:-$SUBMIT_QUEUE}
    SCHED_OPTS=()
    [[ -n $queue ]] && SCHED_OPTS+=("--partition=$queue")
    [[ -n $SUBMIT_ACCOUNT ]] && SCHED_OPTS+=("--account=$SUBMIT_ACCOUNT")
    [[ -n $2 ]] && SCHED_OPTS+=("--cpus-per-task=$2")
    [[ -n $3 ]] && SCHED_OPTS+=("--mem=$3")
    [[ -n $4 ]] && SCHED_OPTS+=("--time=$4")
    [[ -n $5 ]] && SCHED_OPTS+=("--gres=gpu:$5:1")
    SCHED_OPTS+=("$1")
}

backend_array_cmd() {
    _slurm_options "$SLURM_DIR/submit_production_array.sbatch" "${EVEREST_TRAIN_CPUS:-}" \
        "${EVEREST_TRAIN_MEM:-}" "${EVEREST_TRAIN_WALLTIME:-}" "${EVEREST_GPU_TYPE:-}"
    # --export=ALL passes the submitter's environment; an empty EVEREST_INDEX_FILE keeps a stale one
    # from remapping the task ids.
    local array index_file=""
    if backend_uses_index_file; then
        array=1-${#SUBMIT_INDEX_LINES[@]}
        index_file=$SUBMIT_RUN_DIR/indices.txt
    else
        array=$(_slurm_ranges "${SUBMIT_INDICES[@]}")
    fi
    ARRAY_CMD=(sbatch --parsable --job-name=everest-train "--array=$array"
               "--output=$SUBMIT_LOG_DIR/train_%A_%a.log"
               "--export=ALL,$(everest_job_env train),EVEREST_INDEX_FILE=$index_file" "${SCHED_OPTS[@]}")
}

backend_analysis_cmd() {
    _slurm_options "$SLURM_DIR/submit_analysis.sbatch" "${EVEREST_ANALYSIS_CPUS:-}" \
        "${EVEREST_ANALYSIS_MEM:-}" "${EVEREST_ANALYSIS_WALLTIME:-}" "" "${EVEREST_ANALYSIS_QUEUE:-}"
    # A dependency on the array job id waits for all of its tasks.
    ANALYSIS_CMD=(sbatch --parsable --job-name=everest-analysis "--dependency=$SUBMIT_DEPEND:$1"
                  --kill-on-invalid-dep=yes "--output=$SUBMIT_LOG_DIR/analysis_%j.log"
                  "--export=ALL,$(everest_job_env analysis)" "${SCHED_OPTS[@]}")
}

backend_job_id() {  # sbatch --parsable prints "id" or "id;cluster"
    local id
    id=$(head -n 1 <<<"$1" | tr -d '[:space:]')
    id=${id%%;*}
    [[ $id =~ ^[0-9]+$ ]] || return 1
    printf '%s' "$id"
}

backend_monitor() {
    cat <<EOF_MONITOR
Monitor:   squeue -r -j $1          (one line per task while queued or running)
           scontrol show job $1     (state and exit code of each task; kept a few minutes after the end)
           sacct -j $1 --format=JobID,State,ExitCode,Elapsed   (where accounting is enabled)
           squeue -j ${2:-<analysis job>}
Cancel:    scancel $1${2:+ $2}
EOF_MONITOR
    everest_monitor_common
}

everest_submit_main "$(basename -- "$0")" SLURM "$@"
