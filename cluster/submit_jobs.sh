#!/bin/bash
# Submit the EVEREST production run to PBS Pro: the training array job, then the analysis job.
#
#   cluster/submit_jobs.sh --dry-run                  # print the commands, submit nothing
#   cluster/submit_jobs.sh --targets M-48 C-24 --seeds 0 1
#   cluster/submit_jobs.sh --unfinished               # resubmit what has no results yet
#   cluster/submit_jobs.sh --group-width 5            # 9 sub-jobs of 5 experiments, one GPU each
#   cluster/submit_jobs.sh -h
#
# Only the PBS-specific rendering is here; parsing, validation and the submission sequence are in
# cluster/lib.sh, site settings in cluster/site.sh. The SLURM twin is cluster/slurm/submit_jobs.sh.
#
# The array runs over the lines of an index list (PBS Pro arrays are one plain range, -J 1-N):
# sub-job K trains the experiment indices on line K of <output>/submissions/<id>/indices.txt (one
# index, or with --group-width W the W indices of its group, trained as one batched model).
# The analysis waits with `-W depend=afterany:<id>[]`: it starts when every sub-job has ended,
# failed ones included, so its report lists the failures. `--depend afterok` instead starts it only
# when all sub-jobs succeeded (PBS then deletes the analysis job after any failure).
# PBS Pro does not pass the submitting shell's environment on: the jobs get their settings through
# -v, including EVEREST_VENV (default: the active virtual environment, see everest_default_env), and
# PBS's own output files go to <output>/submissions/ (-o), not to the directory you submit from.
set -uo pipefail

EVEREST_CLUSTER_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd) || exit 1
export EVEREST_CLUSTER_DIR
# shellcheck source=cluster/lib.sh
source "$EVEREST_CLUSTER_DIR/lib.sh" || exit 1
# shellcheck source=cluster/site.sh
source "$EVEREST_CLUSTER_DIR/site.sh" || exit 1

backend_name() { echo "PBS Pro"; }

backend_uses_index_file() { true; }

backend_min_array_size() { echo 2; }  # PBS Pro refuses -J 1-1

# The header's select statement with the site overrides applied (command-line -l wins over #PBS -l).
_pbs_select() {
    local script=$1 cpus=$2 mem=$3 gpu_type=$4 sel
    sel=$(sed -n 's/^#PBS -l \(select=[^ ]*\).*/\1/p' "$script" | head -n 1)
    [[ -n $cpus && $sel =~ ^(.*ncpus=)[^:]*(.*)$ ]] && sel=${BASH_REMATCH[1]}$cpus${BASH_REMATCH[2]}
    [[ -n $mem && $sel =~ ^(.*:mem=)[^:]*(.*)$ ]] && sel=${BASH_REMATCH[1]}$mem${BASH_REMATCH[2]}
    [[ -n $gpu_type ]] && sel+=":${EVEREST_PBS_GPU_RESOURCE:-gpu_type}=$gpu_type"
    printf '%s' "$sel"
}

# Queue, account and resource overrides, then the script, into SCHED_OPTS.
#   _pbs_options SCRIPT CPUS MEM WALLTIME GPU_TYPE [QUEUE]
_pbs_options() {
    local queue=${6:-$SUBMIT_QUEUE}
    SCHED_OPTS=()
    [[ -n $queue ]] && SCHED_OPTS+=(-q "$queue")
    [[ -n $SUBMIT_ACCOUNT ]] && SCHED_OPTS+=(-A "$SUBMIT_ACCOUNT")
    [[ -n $2$3$5 ]] && SCHED_OPTS+=(-l "$(_pbs_select "$1" "$2" "$3" "$5")")
    [[ -n $4 ]] && SCHED_OPTS+=(-l "walltime=$4")
    SCHED_OPTS+=("$1")
}

# Without -o PBS copies a job's output file to the directory qsub ran in. A path ending in "/" names
# a directory: PBS writes <job id>.OU there, e.g. 1234[7].server.OU per sub-job (-e as well, should
# a site drop -j oe).
_pbs_output_opts() { PBS_OUTPUT_OPTS=(-o "$SUBMIT_SCHED_DIR/" -e "$SUBMIT_SCHED_DIR/"); }

backend_array_cmd() {
    _pbs_output_opts
    _pbs_options "$EVEREST_CLUSTER_DIR/submit_production_array.pbs" "${EVEREST_TRAIN_CPUS:-}" \
        "${EVEREST_TRAIN_MEM:-}" "${EVEREST_TRAIN_WALLTIME:-}" "${EVEREST_GPU_TYPE:-}"
    ARRAY_CMD=(qsub -N everest-train -J "1-${#SUBMIT_INDEX_LINES[@]}" -j oe "${PBS_OUTPUT_OPTS[@]}"
               -v "$(everest_job_env train),EVEREST_INDEX_FILE=$SUBMIT_RUN_DIR/indices.txt" "${SCHED_OPTS[@]}")
}

backend_analysis_cmd() {
    _pbs_output_opts
    _pbs_options "$EVEREST_CLUSTER_DIR/submit_analysis.pbs" "${EVEREST_ANALYSIS_CPUS:-}" \
        "${EVEREST_ANALYSIS_MEM:-}" "${EVEREST_ANALYSIS_WALLTIME:-}" "" "${EVEREST_ANALYSIS_QUEUE:-}"
    # PBS Pro names an array job 1234[].server: the dependency on it waits for all its sub-jobs.
    ANALYSIS_CMD=(qsub -N everest-analysis -j oe "${PBS_OUTPUT_OPTS[@]}" -W "depend=$SUBMIT_DEPEND:$1"
                  -v "$(everest_job_env analysis)" "${SCHED_OPTS[@]}")
}

backend_job_id() {  # qsub prints the id: 1234[].server for an array, 1235.server for a job
    local id
    id=$(head -n 1 <<<"$1" | tr -d '[:space:]')
    [[ $id =~ ^[0-9]+(\[[0-9]*\])?(\.[A-Za-z0-9_.-]+)?$ ]] || return 1
    printf '%s' "$id"
}

backend_monitor() {
    cat <<EOF_MONITOR
Monitor:   qstat -t $1          (one line per sub-job; finished ones with: qstat -x -t $1)
           qstat ${2:-<analysis job>}
           qstat -x -f '<number>[K].<server>'   (sub-job K in detail, e.g. its Exit_status)
Cancel:    qdel $1${2:+; qdel $2}
PBS files: $SUBMIT_SCHED_DIR/<job id>.OU (what a job printed before its log started, e.g. a failed activation)
EOF_MONITOR
    everest_monitor_common
}

everest_submit_main "$(basename -- "$0")" "PBS Pro" "$@"
