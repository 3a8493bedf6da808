# wanda-bench: model x method x pattern, pruned and evaluated in cached stages.
# Run: snakemake --cores all   (GPU box: --resources gpu=4; cluster: --profile profiles/slurm --workflow-profile none)
from snakemake.utils import min_version

min_version("9.0")


# The demo config, unless a config file is given (`--configfile config/paper.yaml`): Snakemake would
# otherwise merge the two, and the demo's model would join the paper's grid.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/resources.smk"
include: "workflow/rules/calibrate.smk"
include: "workflow/rules/prune.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/aggregate.smk"


rule all:
    input:
        rules.aggregate.output,
    default_target: True
