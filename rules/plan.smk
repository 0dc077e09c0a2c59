rule plan:
    """The run plan for the current config and model, before any GPU work: jobs per rule,
    bytes of scratch / merged moments / projections, memory per job, GPU-hours.

    `snakemake plan` prints it and writes results/plan.txt; reads configs only (no weights).
    """
    output:
        RESULTS.plan,
    log:
        "logs/plan.log",
    localrule: True
    conda:
        "../envs/nullcov.yaml"
    params:
        plan=run_plan(),
    script:
        "../scripts/plan.py"
