rule plan:
    """The run plan for the current config and model, before any GPU work: jobs per rule,
    bytes of scratch / merged moments / projections, memory per job, GPU-hours.

    `snakemake plan` prints it and writes results/plan.txt; reads configs only (no weights).
    """
    localrule: True
    output:
        "results/plan.txt",
    params:
        plan=run_plan(),
    log:
        "logs/plan.log",
    conda:
        "../envs/nullcov.yaml"
    script:
        "../scripts/plan.py"
