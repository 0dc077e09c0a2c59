rule tiny_model:
    """The embedded deterministic tiny SD-1.x model (model: builtin:tiny)."""
    output:
        directory(nc_model.BUILTIN_TINY_DIR),
    log:
        "logs/tiny_model.log",
    localrule: True
    conda:
        "../envs/nullcov.yaml"
    script:
        "../scripts/build_tiny_model.py"
