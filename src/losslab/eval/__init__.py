"""losslab.eval"""
