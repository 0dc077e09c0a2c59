rule projection:
    """Null-space projection P = U0 U0^T of one timestep's statistic (float64 eigh)."""
    input:
        "results/covariance/{name}.h5",
    output:
        "results/projections/{name}.h5",
    log:
        "logs/projections/{name}.log",
    benchmark:
        "benchmarks/projections/{name}.tsv"
    conda:
        "../envs/nullcov.yaml"
    resources:
        mem_mb=projection_mem_mb,
    params:
        statistic=config["statistic"],
        nullspace_threshold=config["nullspace_threshold"],
        threshold_percent=config["threshold_percent"],
    script:
        "../scripts/projection.py"


use rule projection as projection_text with:
    input:
        "results/covariance/text.h5",
    output:
        "results/projections/text.h5",
    log:
        "logs/projections/text.log",
    benchmark:
        "benchmarks/projections/text.tsv"
