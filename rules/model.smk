rule tiny_model:
    """An embedded deterministic tiny model (model: builtin:tiny, builtin:tiny-sd2, -sdxl, -lcm)."""
    localrule: True
    output:
        directory("resources/models/{builtin}"),
    params:
        family=lambda wildcards: BUILTIN_FAMILIES[wildcards.builtin],
    log:
        "logs/tiny_model/{builtin}.log",
    conda:
        "../envs/nullcov.yaml"
    script:
        "../scripts/build_tiny_model.py"
