# Calibration windows per (model tokenizer, data set, sampler, nsamples, seqlen, seed), shared by every method of that seed;
# the file name holds the model's own length (seqlen: model -> its max_position_embeddings, which the job checks).


rule calibrate:
    input:
        model="resources/models/{model}",
        data=lambda wc: f"resources/data/{config['calibration']['dataset']}.jsonl",
    output:
        "results/calibration/{model}/{calibration}.safetensors",
    params:
        nsamples=config["calibration"]["nsamples"],
        seqlen=lambda wc: grid.seqlen_option(config, wc.model, "calibration"),
        seed=lambda wc: CALIBRATION_SEEDS[(wc.model, wc.calibration)],
        model=lambda wc: model_flags(wc, blocks=False),
        sampler=config["calibration"]["sampler"],
    log:
        "results/logs/calibrate/{model}/{calibration}.log",
    benchmark:
        "results/benchmarks/calibrate/{model}/{calibration}.tsv"
    conda:
        "../../environment.yml"
    shell:
        "wanda-core --max-threads {threads} --log {log} calibrate --model {input.model} {params.model} --data {input.data}"
        " --nsamples {params.nsamples} --seqlen {params.seqlen} --seed {params.seed} --sampler {params.sampler} --out {output}"
