"""losslab.compare"""
