# Set-up and the two main jobs. Every target creates .venv and installs what it needs.
#   make demo   train the autoencoder and the text-to-image model on the bundled digits,
#               write outputs/demo_samples.png and export checkpoints/demo/
#   make test   run the test suite
#   make finetune-demo   (after make demo) LoRA fine-tune of the demo on mirrored digits, scored before/after
# Elsewhere, pick the torch build for your machine: make demo TORCH="torch torchvision"
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.ldm-installed

.PHONY: install demo finetune-demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ldm data prepare digits --out data/digits
	$(BIN)/ldm fit --config configs/autoencoder/digits.yaml
	$(BIN)/ldm reconstruct --model checkpoints/digits-vae --data data/digits --out outputs/digits_vae_reconstructions.png
	$(BIN)/ldm data tokenizer digits --out checkpoints/digits-tokenizer
	$(BIN)/ldm fit --config configs/diffusion/digits.yaml
	$(BIN)/ldm evaluate digits --model checkpoints/demo --steps 20 --guidance 3 --out outputs/demo_samples.png

finetune-demo: $(STAMP)
	test -f checkpoints/demo/model_index.json || { echo "run make demo first (it writes checkpoints/demo)"; exit 1; }
	$(BIN)/ldm data prepare mirrored_digits --out data/mirrored_digits
	$(BIN)/ldm evaluate mirrored --model checkpoints/demo --grid outputs/mirrored_before.png
	$(BIN)/ldm fit --config configs/finetune/demo-lora.yaml
	$(BIN)/ldm evaluate mirrored --model checkpoints/demo --lora checkpoints/demo-mirrored-lora --grid outputs/mirrored_after.png

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf logs outputs lightning_logs checkpoints/digits-vae checkpoints/digits-tokenizer checkpoints/demo checkpoints/demo-mirrored-lora data/cache
