rule projection:
    """Null-space projection P = U0 U0^T of one timestep's statistic (float64 eigh)."""
    input:
        RESULTS.covariance("{name}"),
    output:
        RESULTS.projection("{name}"),
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
        RESULTS.covariance(nc_layout.TEXT_NAME),
    output:
        RESULTS.projection(nc_layout.TEXT_NAME),
    log:
        "logs/projections/text.log",
    benchmark:
        "benchmarks/projections/text.tsv"
