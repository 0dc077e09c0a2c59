# The report: spectra, null-space dimensions, attention maps and the run summary.
# `snakemake --report results/report.html` gathers every file flagged report(...) below and in
# rules/validation.smk into one browsable HTML page; the PNGs are plain files as well.


REPORT_FIGURE_LABELS = {
    "spectra_to_q": "spectra of to_q inputs",
    "spectra_to_out": "spectra of to_out inputs",
    "spectra_text": "spectrum of the text states (to_k/to_v)",
    "null_dim": "null_dim heatmaps (to_q, to_out)",
}


rule report_figures:
    """Eigenvalue spectra (report steps) and null-space dimension heatmaps from the projection files."""
    input:
        schedule=RESULTS.schedule,
        projections=projection_files(SHARD_FILE_NAMES),
    output:
        [
            report(
                path,
                caption=f"../report/{'spectra' if kind.startswith('spectra') else kind}.rst",
                category="2. Spectra" if kind.startswith("spectra") else "3. Null-space dimension",
                labels={"figure": REPORT_FIGURE_LABELS[kind]},
            )
            for kind, path in REPORT_FIGURES.items()
        ],
    log:
        "logs/report/figures.log",
    conda:
        "../envs/nullcov.yaml"
    params:
        figures=REPORT_FIGURES,
        step_names=STEP_NAMES if COLLECT_STEPS else [],
        report_steps=REPORT_STEPS,
    script:
        "../scripts/report_figures.py"


rule training_curve:
    """The model's training losses, from the training.json its folder carries (builtin:shapes)."""
    input:
        record=str(TRAINING_RECORD),
    output:
        report(
            TRAINING_CURVE_FIGURE,
            caption="../report/training_curve.rst",
            category="0. Model",
            labels={"figure": "training curve"},
        ),
    log:
        "logs/report/training_curve.log",
    localrule: True
    conda:
        "../envs/nullcov.yaml"
    script:
        "../scripts/training_curve.py"


rule attention_maps:
    """Cross-attention maps of a few prompts at a few steps: the feature job's pipeline call and seeds."""
    input:
        schedule=RESULTS.schedule,
        model=model_input,
    output:
        data=ATTENTION_DATA,
        figures=[
            report(
                path,
                caption="../report/attention.rst",
                category="4. Attention maps",
                labels=attention_labels(index, name),
            )
            for (index, name), path in ATTENTION_FIGURES.items()
        ],
    log:
        "logs/report/attention_maps.log",
    benchmark:
        "benchmarks/attention_maps/attention_maps.tsv"
    conda:
        "../envs/nullcov.yaml"
    threads: GPU_JOB_THREADS
    resources:
        gpu=1,
        mem_mb=model_job_mem_mb,
    params:
        prompts=[PROMPTS[index] for index in ATTENTION_PROMPTS],
        prompt_indices=ATTENTION_PROMPTS,
        step_indices=REPORT_STEPS,
        figure_paths=[[index, name, path] for (index, name), path in ATTENTION_FIGURES.items()],
        layers=config["attention_layers"],
        model_dir=str(MODEL_DIR),
        config=feature_config(config),
    script:
        "../scripts/attention_maps.py"


rule run_summary:
    """Model, prompts, shards, schedule, statistic, threshold, wall times and disk use of the run."""
    input:
        schedule=RESULTS.schedule,
        projections=projection_files(SHARD_FILE_NAMES),
        first_shard=SHARD_FOLDERS[0],  # its provenance describes the run
        everything=summary_inputs,  # the summary runs after every other job of the run
    output:
        html=report(
            SUMMARY_OUTPUTS["html"],
            caption="../report/summary.rst",
            category="1. Run summary",
            labels={"table": "run summary"},
        ),
        tsv=SUMMARY_OUTPUTS["tsv"],
    log:
        "logs/report/summary.log",
    localrule: True
    conda:
        "../envs/nullcov.yaml"
    params:
        benchmarks=summary_benchmarks,
        folders=summary_folders,
        num_prompts=len(PROMPTS),
        prompt_sha256=PROMPT_SHA256,
        num_shards=len(SHARD_IDS),
        prompts_per_shard=PROMPTS_PER_SHARD,  # resolved (auto -> a number)
        num_validation=len(VALIDATION_PROMPTS),
        validation_file=str(VALIDATION_FILE),
        shard_file_name=nc_layout.step_file_name(SHARD_FILE_NAMES[0]),
    script:
        "../scripts/run_summary.py"
