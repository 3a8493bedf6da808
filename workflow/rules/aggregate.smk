# Everything in one long Parquet table, then the paper's tables (Markdown + CSV) and a plot.


rule aggregate:
    input:
        ppl=ppl_results(),
        zeroshot=zeroshot_results(),
        reports=prune_reports(),
        published=PUBLISHED,
    output:
        benchmark="results/benchmark.parquet",
        table="results/tables/perplexity.md",
        csv="results/tables/perplexity.csv",
        zeroshot_table="results/tables/zeroshot.md",
        zeroshot_csv="results/tables/zeroshot.csv",
        plot=report("results/plots/perplexity.png", caption="../report/perplexity.rst", category="Perplexity"),
    params:
        runs=RUNS,
        config=config,
        published=PUBLISHED,
    log:
        "logs/aggregate.log",
    conda:
        "../../environment.yml"
    localrule: True
    script:
        "../scripts/aggregate.py"
