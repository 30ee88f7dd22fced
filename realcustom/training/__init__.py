"""Training of RealCustom++'s added weights with the Curriculum Training Recipe (CTR).

Only the projector (CCP) and every attn2 layer's `to_k_vision`/`to_v_vision` learn; the backbone,
the text encoders, the VAE and the reference encoders stay frozen. The curriculum is a list of
stages in one YAML file (`configs/train/*.yaml`), each with its own data mix, reference
construction, resolution and length. See docs/TRAINING.md.
"""
