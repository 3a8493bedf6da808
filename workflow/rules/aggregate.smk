# Everything in one long Parquet table, then the paper's tables (Markdown, CSV, HTML for the report) and plots
# (outputs: aggregate_outputs() in common.smk).
rule aggregate:
    input:
        ppl=ppl_results(),
        zeroshot=zeroshot_results(),
        reports=prune_reports(),
        layers=prune_layers(),
        published=PUBLISHED,
    output:
        **aggregate_outputs(),
    params:
        # Labels, groups and published figures shape the tables: a short hash of the config reruns them
        # when it changes (the config itself would fill `snakemake -n`'s reasons).
        config_hash=CONFIG_HASH,
    log:
        "results/logs/aggregate.log",
    conda:
        "../../environment.yml"
    localrule: True
    script:
        "../scripts/aggregate.py"
