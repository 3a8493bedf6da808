# Calibration windows per (model tokenizer, data set, nsamples, seqlen, seed), shared by every method.


rule calibrate:
    input:
        model="resources/models/{model}",
        data=lambda wc: f"resources/data/{config['calibration']['dataset']}.jsonl",
    output:
        "results/calibration/{model}/{calibration}.safetensors",
    params:
        nsamples=config["calibration"]["nsamples"],
        seqlen=config["calibration"]["seqlen"],
        seed=config["calibration"]["seed"],
    log:
        "logs/calibrate/{model}/{calibration}.log",
    conda:
        "../../environment.yml"
    shell:
        "wanda-core --max-threads {threads} --log {log} calibrate --model {input.model} --data {input.data} --nsamples {params.nsamples}"
        " --seqlen {params.seqlen} --seed {params.seed} --out {output}"
