# hook.cmake: adds recall_bench to a kvstore build whose bench/CMakeLists.txt
# does not add_subdirectory(recall) (yet). bench/recall/run.sh passes it as
# -DCMAKE_PROJECT_kvstore_INCLUDE=...; it runs right after project() and
# defers the target to the end of the top-level CMakeLists.txt, when the
# kvstore targets exist (a deferred call may not add subdirectories, hence
# the target is declared here as in bench/recall/CMakeLists.txt). Where
# bench/ already added recall, it does nothing.
function(kvs_recall_add)
    if(NOT TARGET recall_bench)
        set(dir ${CMAKE_SOURCE_DIR}/bench/recall)
        add_executable(recall_bench ${dir}/recall_bench.c
                                    ${dir}/hnsw_count.cpp)
        target_link_libraries(recall_bench PRIVATE kvstore kvs_index kvs_faiss_c
                              ${MATH_LIB})
        set_target_properties(recall_bench PROPERTIES RUNTIME_OUTPUT_DIRECTORY
                              ${CMAKE_BINARY_DIR}/bench/recall)
    endif()
endfunction()
cmake_language(DEFER CALL kvs_recall_add)
