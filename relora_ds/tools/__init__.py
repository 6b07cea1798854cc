"""The tools on top of training, one module per `relora-ds` subcommand: export (a checkpoint as a Hugging Face
model), eval (held-out perplexity of a checkpoint or a model dir), analyze (ΔW spectra) and compare (the paper's
variants of one base config), and reader.py, the one reader of a model's weights that export, eval and analyze
share. They may import one another and the rest of the package; only the command line (cli.py, train.py) imports
them."""
