"""`medgpt plan`: will a training run fit in GPU memory? `memory` holds the formulas (bytes per GPU from the
model's config.json), `verdict` what the command says with them (the table, fits or not, the fixes, the dtype)."""
