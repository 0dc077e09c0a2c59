rule tiny_model:
    """An embedded deterministic tiny model (model: builtin:tiny, builtin:tiny-sd2, -sdxl, -lcm)."""
    output:
        directory("resources/models/{builtin}"),
    log:
        "logs/tiny_model/{builtin}.log",
    localrule: True
    conda:
        "../envs/nullcov.yaml"
    params:
        family=lambda wildcards: BUILTIN_FAMILIES[wildcards.builtin],
    script:
        "../scripts/build_tiny_model.py"
