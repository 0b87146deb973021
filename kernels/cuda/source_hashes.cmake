# cmake -DCU=<file.cu> -DOUT=<file> -P source_hashes.cmake
# Writes one "<file name> <sha256>" line for CU and for every header beside it, sorted by
# name: the sources a fatbin was built from.  The CuPy launcher recomputes these lines and
# compiles with NVRTC instead of loading a fatbin older than its sources.
get_filename_component(dir "${CU}" DIRECTORY)
file(GLOB headers "${dir}/*.cuh")
set(lines "")
foreach(f IN LISTS CU headers)
  file(SHA256 "${f}" digest)
  get_filename_component(name "${f}" NAME)
  list(APPEND lines "${name} ${digest}")
endforeach()
list(SORT lines)
string(REPLACE ";" "\n" text "${lines}")
file(WRITE "${OUT}" "${text}\n")
