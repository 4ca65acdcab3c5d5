"""losslab.data"""
