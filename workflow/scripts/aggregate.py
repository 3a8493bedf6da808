# Snakemake script: hands the rule's files to wanda_core.aggregate.aggregate and prints the tables.
import sys

from wanda_core.aggregate import aggregate

with open(snakemake.log[0], "w") as log:
    sys.stderr = log
    text = aggregate(
        snakemake.input.ppl,
        snakemake.input.reports,
        snakemake.input.zeroshot,
        {**snakemake.config, "published": (snakemake.input.published or [None])[0]},
        dict(snakemake.output.items()),
        snakemake.input.layers,
    )
if text:
    print(text, file=sys.__stdout__)
