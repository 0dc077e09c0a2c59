# Validation of the null space: do projected updates leave unseen (validation) prompts alone?
# validation_inputs -> leakage (per chunk of steps) -> validation_report (table and figures)


# validation_inputs: the validation prompts through the feature job itself (rule features: same
# inputs, threads, script and feature config), exact moments per step and text.h5. Validation
# prompt j is seeded seed + validation_seed_offset + j (distinct from every training prompt's
# seed + i). `use rule ... with:` replaces resources as a whole and params key by key.
use rule features as validation_inputs with:
    output:
        directory(RESULTS.validation_features),
    log:
        "logs/validation/features.log",
    benchmark:
        "benchmarks/validation_inputs/validation.tsv"
    resources:
        gpu=1,
        mem_mb=feature_job_mem_mb,
        runtime=validation_inputs_minutes,
    params:
        prompts=VALIDATION_PROMPTS,
        first_index=config["validation_seed_offset"],
        shard="validation",


rule leakage:
    """Leakage ‖ΔW P Xᵀ‖/‖ΔW Xᵀ‖ of seeded random updates on validation and training inputs (CPU).

    One job per chunk of nullcov.workflow.plan.LEAKAGE_STEPS_PER_JOB steps (text.h5 rides with the last chunk).
    """
    input:
        covariance=leakage_covariance,
        projections=leakage_projections,
        validation=RESULTS.validation_features,
        schedule=RESULTS.schedule,
    output:
        LEAKAGE_TABLE,
    log:
        "logs/validation/leakage_{part}.log",
    benchmark:
        "benchmarks/leakage/part_{part}.tsv"
    wildcard_constraints:
        part=r"\d{3}",
    conda:
        "../envs/nullcov.yaml"
    params:
        names=leakage_names,
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
        schedule=RESULTS.schedule,
    output:
        table=report(
            VALIDATION_OUTPUTS["table"],
            caption="../report/leakage_table.rst",
            category="5. Validation: leakage",
            labels={"figure": "table (every step, layer, threshold, ΔW)"},
        ),
        tradeoff=report(
            VALIDATION_OUTPUTS["tradeoff"],
            caption="../report/leakage_tradeoff.rst",
            category="5. Validation: leakage",
            labels={"figure": "trade-off: leakage vs null_dim"},
        ),
        heatmap=report(
            VALIDATION_OUTPUTS["heatmap"],
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
