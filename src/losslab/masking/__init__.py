"""losslab.masking"""
