rule merge_group:
    """Partial sums of one group of consecutive shards, every step (when shards outnumber
    shards_per_merge_group): no merge job reads more than that many shards' or groups' files.
    """
    input:
        group_shard_folders,
    output:
        scratch_output(RESULTS.group("{group}")),
    log:
        "logs/merge_group/group_{group}.log",
    benchmark:
        "benchmarks/merge_group/group_{group}.tsv"
    conda:
        "../envs/nullcov.yaml"
    resources:
        mem_mb=merge_mem_mb,
    params:
        file_names=SHARD_FILE_NAMES,
    script:
        "../scripts/merge_group.py"


rule covariance:
    """Sum of every shard's (or group's) moments for one timestep (exact float64 sums)."""
    input:
        merge_inputs,
    output:
        RESULTS.covariance("{name}"),
    log:
        "logs/covariance/{name}.log",
    benchmark:
        "benchmarks/covariance/{name}.tsv"
    conda:
        "../envs/nullcov.yaml"
    resources:
        mem_mb=merge_mem_mb,
    params:
        file_name=lambda wildcards: nc_layout.step_file_name(wildcards.name),
        prompt_sha256=PROMPT_SHA256,
        kind=MERGE_KIND,
    script:
        "../scripts/covariance.py"


use rule covariance as covariance_text with:
    output:
        RESULTS.covariance(nc_layout.TEXT_NAME),
    log:
        "logs/covariance/text.log",
    benchmark:
        "benchmarks/covariance/text.tsv"
    params:
        file_name=nc_layout.step_file_name(nc_layout.TEXT_NAME),
