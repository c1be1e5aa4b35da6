"""Generic pieces every command uses: the model checkpoint format and `load_models` (model_checkpoints), checkpoint
file I/O (checkpoint), Hugging Face Hub references (hub), the one atomic writer (fileio), one-line CLI errors and flag
types (cli), the official command-line spellings (official), the VARiant subnet flags shared by sampling and
training (subnet_flags), logging, images, plots, weight export and the Fashion-MNIST preparation. The engines live in
training/, evaluation/ and generation/."""
