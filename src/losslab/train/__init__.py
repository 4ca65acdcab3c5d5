"""losslab.train"""
