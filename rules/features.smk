rule features:
    """One prompt shard through the sampler: exact moments per scheduled step and text.h5.

    Shard membership is a param (not the prompt file), so appending prompts reruns only the
    shards whose prompt list changed. The output is the shard's folder, holding {name}.h5 per
    scheduled step and text.h5: one output instead of one per step keeps the DAG of a
    1000-step schedule fast to build.
    """
    input:
        schedule=RESULTS.schedule,
        model=model_input,
    output:
        scratch_output(RESULTS.shard("{shard}")),
    log:
        "logs/features/shard_{shard}.log",
    benchmark:
        "benchmarks/features/shard_{shard}.tsv"
    conda:
        "../envs/nullcov.yaml"
    threads: GPU_JOB_THREADS
    resources:
        gpu=1,
        mem_mb=feature_job_mem_mb,
        runtime=feature_job_minutes,
    params:
        file_names=SHARD_FILE_NAMES,
        prompts=shard_prompts,
        first_index=shard_first_index,
        shard=lambda wildcards: wildcards.shard,
        model=config["model"],
        model_dir=str(MODEL_DIR),
        # Only the keys that change the statistics: editing batch_size or device reruns nothing.
        config=FEATURE_CONFIG,
    script:
        "../scripts/features.py"
