"""Pretraining: MoCo v1/v2, SupCon (also with a momentum queue), the linear probe, one Trainer."""
