"""kvcomm.kernels"""
