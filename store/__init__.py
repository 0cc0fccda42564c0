"""kvcomm.store"""
