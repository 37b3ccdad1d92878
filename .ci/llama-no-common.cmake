# Build llama-cpp-python without llama.cpp's `common` library (the Python package never loads it):
# its CMakeLists force-sets LLAMA_BUILD_COMMON=ON in the cache; an ordinary variable set here wins.
set(LLAMA_BUILD_COMMON OFF)
