"""Merged model -> GGUF files for llama.cpp: the quant table, llama.cpp's converter, quantisation, chat.

llama-cpp-python is optional: modules here import ``llama_cpp`` only when a file is quantised or run.
"""
