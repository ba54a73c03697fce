# shellcheck shell=bash
# Site settings for the EVEREST batch scripts: the ONE file to edit for a new cluster.
#
# Sourced by cluster/submit_jobs.sh, cluster/slurm/submit_jobs.sh and by every batch job (training
# sub-jobs and the analysis job), so the environment is activated the same way everywhere.
# Every setting can also be given in the environment of the submit command (the environment wins),
# e.g. `EVEREST_GPU_TYPE=a100 cluster/submit_jobs.sh ...`.

# ---------------------------------------------------------------- software environment
# Called at the start of every job and of the submit scripts. Put your `module load` lines and the
# activation of the Python environment that has `everest` installed here. Return non-zero on failure:
# the job then stops with a clear error instead of failing later on an import.
everest_activate() {
    # Examples (uncomment / adapt):
    #   module purge && module load cuda/12.4 || return 1
    #   source "$HOME/miniforge3/etc/profile.d/conda.sh" && conda activate everest || return 1

    # Default: EVEREST_VENV, which the submit scripts set, when it is not set already, to the
    # environment you submit from (the active virtual environment, else the python3/python on PATH
    # that imports everest) and pass to the jobs; else the project's own virtual environment (made
    # by `make install`), when it exists. Without either, `python` on PATH is used.
    local venv=${EVEREST_VENV:-$EVEREST_CLUSTER_DIR/../.venv}
    if [[ -f $venv/bin/activate ]]; then
        # shellcheck disable=SC1091  # the path is only known at run time
        source "$venv/bin/activate" || return 1
    elif [[ -n ${EVEREST_VENV:-} ]]; then
        printf 'everest: error: EVEREST_VENV=%s has no bin/activate\n' "$EVEREST_VENV" >&2
        return 1
    fi
}

# Python interpreter used after activation.
: "${EVEREST_PYTHON:=python}"

# ---------------------------------------------------------------- where things are
# Relative paths are taken from the directory you submit from.
: "${EVEREST_DATA_DIR:=data}"       # the 18 SHARP CSVs (training_data_*.csv, testing_data_*.csv)
: "${EVEREST_OUTPUT_DIR:=output}"   # results/, checkpoints/, logs/, submissions/, analysis/

# ---------------------------------------------------------------- scheduler defaults
# Empty means "not given": the scheduler's default queue/partition and account are used.
: "${EVEREST_QUEUE:=}"
: "${EVEREST_ACCOUNT:=}"
: "${EVEREST_ANALYSIS_QUEUE:=}"  # queue/partition of the CPU analysis job; empty: the same as --queue
# GPU model for the training sub-jobs, e.g. l40s (PBS Pro: select=...:ngpus=1:gpu_type=l40s, if your
# site defines that resource; SLURM: --gres=gpu:l40s:1). Empty: any GPU.
: "${EVEREST_GPU_TYPE:=}"

# Resource overrides. Empty: the values in the #PBS / #SBATCH header lines of the job scripts
# (training: 4 cores, 32 GB, 1 GPU, 12 h; analysis: 4 cores, 16 GB, 2 h). Memory in PBS form
# (32gb) for PBS and SLURM form (32G) for SLURM.
: "${EVEREST_TRAIN_CPUS:=}"
: "${EVEREST_TRAIN_MEM:=}"
: "${EVEREST_TRAIN_WALLTIME:=}"
: "${EVEREST_ANALYSIS_CPUS:=}"
: "${EVEREST_ANALYSIS_MEM:=}"
: "${EVEREST_ANALYSIS_WALLTIME:=}"

# ---------------------------------------------------------------- experiments per sub-job
# Group width W: each training sub-job trains W experiments as one batched model on its one GPU
# (ceil(n/W) sub-jobs instead of n; faster on GPUs, where one experiment leaves most of the GPU idle).
# GPU memory grows with W; raise EVEREST_TRAIN_MEM and the walltime with it. 1: one experiment per
# sub-job. --group-width on the submit command overrides it.
: "${EVEREST_GROUP_WIDTH:=1}"

# ---------------------------------------------------------------- GPU isolation
# Where the site sets CUDA_VISIBLE_DEVICES per job (a cgroup/GPU hook; SLURM with gres), or gives
# each job a whole node, nothing is needed. Otherwise every training sub-job pins itself to a free
# GPU of its node through an flock on EVEREST_GPU_LOCK_DIR/everest-gpu-<index>.lock (a directory
# local to the node) and exports CUDA_VISIBLE_DEVICES; see "GPU isolation" in cluster/README.md.
# EVEREST_PIN_GPU=0 turns that off.
: "${EVEREST_PIN_GPU:=1}"
: "${EVEREST_GPU_LOCK_DIR:=/tmp}"
