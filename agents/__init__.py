"""kvcomm.agents"""
