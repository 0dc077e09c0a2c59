rule schedule:
    """The real sampler's timesteps and the layers to collect, checked against the model (CPU).

    Both are computed when the Snakefile is parsed (SCHEDULE, LAYERS in rules/common.smk); this
    local rule writes them down inside the Snakemake process (no interpreter to start, no
    diffusers to import). Every feature job checks its UNet calls against the file.
    """
    input:
        model=model_input,
    output:
        RESULTS.schedule,
    log:
        "logs/schedule.log",
    localrule: True
    run:
        with nc_joblog.logging_to(log[0]):
            nc_schedule.write_schedule(output[0], SCHEDULE, LAYERS, config["model"])
