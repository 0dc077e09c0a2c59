rule covariance:
    """Sum of every shard's moments for one timestep (exact float64 sums)."""
    input:
        shard_folders,
    output:
        "results/covariance/{name}.h5",
    log:
        "logs/covariance/{name}.log",
    benchmark:
        "benchmarks/covariance/{name}.tsv"
    conda:
        "../envs/nullcov.yaml"
    resources:
        mem_mb=merge_mem_mb,
    params:
        file_name=lambda wildcards: f"{wildcards.name}.h5",
        prompt_sha256=nc_prompts.prompt_set_sha256(PROMPTS),
    script:
        "../scripts/covariance.py"


use rule covariance as covariance_text with:
    output:
        "results/covariance/text.h5",
    log:
        "logs/covariance/text.log",
    benchmark:
        "benchmarks/covariance/text.tsv"
    params:
        file_name="text.h5",
        prompt_sha256=nc_prompts.prompt_set_sha256(PROMPTS),
