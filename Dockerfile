# revformer on a CUDA machine: `docker build -t revformer . && docker run --gpus all revformer`
# runs the tiny pretraining recipe; pass another command to run anything else, e.g.
#   docker run --gpus all -v $PWD/runs:/workspace/revformer/runs revformer \
#     accelerate launch --config_file configs/accelerate/multi_gpu.yaml scripts/pretrain.py --config configs/gpt2_small_8k.yaml
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    HF_HOME=/workspace/hf_home \
    WANDB_DIR=/workspace/revformer/runs

WORKDIR /workspace/revformer
COPY pyproject.toml README.md ./
COPY revformer ./revformer
RUN pip install --no-cache-dir -e .
COPY configs ./configs
COPY scripts ./scripts
COPY benchmarks ./benchmarks

CMD ["accelerate", "launch", "--config_file", "configs/accelerate/single_gpu.yaml", \
     "scripts/pretrain.py", "--config", "configs/tiny.yaml"]
