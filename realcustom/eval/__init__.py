"""DreamBench evaluation of RealCustom++: generation, CLIP-T / CLIP-I / DINO-I, report and gallery.

`python -m realcustom.eval --dreambench DIR --model NAME --out OUT` (see docs/EVALUATION.md).
"""
