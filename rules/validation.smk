# Validation of the null space: do projected updates leave unseen (validation) prompts alone?
# validation_inputs -> leakage (per chunk of steps) -> validation_report (table and figures)


rule validation_inputs:
    """The validation prompts through the feature job itself: exact moments per step and text.h5.

    Validation prompt j is seeded seed + validation_seed_offset + j (distinct from every
    training prompt's seed + i); everything else is the training run's feature config.
    """
    input:
        schedule="results/schedule.json",
        model=model_input,
    output:
        directory("results/validation/features"),
    log:
        "logs/validation/features.log",
    benchmark:
        "benchmarks/validation_inputs/validation.tsv"
    conda:
        "../envs/nullcov.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=feature_job_mem_mb,
        runtime=lambda wildcards, attempt: attempt * (15 + len(VALIDATION_PROMPTS) * len(STEP_NAMES) // 300),
    params:
        file_names=SHARD_FILE_NAMES,
        prompts=VALIDATION_PROMPTS,
        first_index=config["validation_seed_offset"],
        shard="validation",
        model=config["model"],
        model_dir=str(MODEL_DIR),
        config=feature_config(config),
    script:
        "../scripts/features.py"


rule leakage:
    """Leakage ‖ΔW P Xᵀ‖/‖ΔW Xᵀ‖ of seeded random updates on validation and training inputs (CPU).

    One job per chunk of LEAKAGE_STEPS_PER_JOB steps (text.h5 rides with the last chunk).
    """
    input:
        covariance=leakage_part_files("covariance"),
        projections=leakage_part_files("projections"),
        validation="results/validation/features",
        schedule="results/schedule.json",
    output:
        "results/validation/leakage/part_{part}.tsv",
    log:
        "logs/validation/leakage_{part}.log",
    benchmark:
        "benchmarks/leakage/part_{part}.tsv"
    wildcard_constraints:
        part=r"\d{3}",
    conda:
        "../envs/nullcov.yaml"
    params:
        names=lambda wildcards: LEAKAGE_PARTS[int(wildcards.part)],
        statistic=config["statistic"],
        thresholds=config["validation_thresholds"],
        updates=config["validation_updates"],
        seed=config["seed"],
    script:
        "../scripts/leakage.py"


rule validation_report:
    """All leakage rows in one table, the trade-off curve and the per-layer heatmap."""
    input:
        parts=leakage_tables,
        schedule="results/schedule.json",
    output:
        table=report(
            "results/validation/leakage.tsv",
            caption="../report/leakage_table.rst",
            category="5. Validation: leakage",
            labels={"figure": "table (every step, layer, threshold, ΔW)"},
        ),
        tradeoff=report(
            "results/report/validation/leakage_tradeoff.png",
            caption="../report/leakage_tradeoff.rst",
            category="5. Validation: leakage",
            labels={"figure": "trade-off: leakage vs null_dim"},
        ),
        heatmap=report(
            "results/report/validation/leakage_heatmap.png",
            caption="../report/leakage_heatmap.rst",
            category="5. Validation: leakage",
            labels={"figure": "configured threshold: per layer and timestep"},
        ),
    log:
        "logs/validation/report.log",
    conda:
        "../envs/nullcov.yaml"
    script:
        "../scripts/validation_report.py"
