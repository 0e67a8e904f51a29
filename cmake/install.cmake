# The installable C library: libkvstore.so and libkvsclient.so (versioned
# SONAME), the public headers, pkg-config files and a CMake package
# (find_package(kvstore) -> kvstore::kvstore, kvstore::kvsclient).
#
# The static libraries that the tests and tools link stay as they are; the
# shared ones are linked from the same (position-independent) objects, so
# nothing is compiled twice. A version script exports the public API only.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

# Objects of the engine and of every module it links (GPU parts where built).
set(kvs_engine_parts kvstore kvs_index kvs_kernels kvs_common)
foreach(t kvs_buffer kvs_cuda)
    if(TARGET ${t})
        list(APPEND kvs_engine_parts ${t})
    endif()
endforeach()
set(kvs_engine_objects "")
foreach(t ${kvs_engine_parts})
    list(APPEND kvs_engine_objects $<TARGET_OBJECTS:${t}>)
endforeach()

add_library(kvstore_shared SHARED ${kvs_engine_objects})
target_link_libraries(kvstore_shared PRIVATE PkgConfig::ROCKSDB openblas
                      Threads::Threads ${MATH_LIB})
if(TARGET kvs_cuda)
    find_package(CUDAToolkit REQUIRED) # its targets are directory-scoped
    target_link_libraries(kvstore_shared PRIVATE CUDA::cudart_static)
endif()

add_library(kvsclient_shared SHARED $<TARGET_OBJECTS:kvsclient>
            $<TARGET_OBJECTS:kvs_proto> $<TARGET_OBJECTS:kvs_common>)
target_link_libraries(kvsclient_shared PRIVATE PkgConfig::PROTOBUFC
                      Threads::Threads)

foreach(lib kvstore kvsclient)
    set_target_properties(${lib}_shared PROPERTIES
        OUTPUT_NAME ${lib}
        EXPORT_NAME ${lib}
        VERSION ${PROJECT_VERSION}
        SOVERSION ${PROJECT_VERSION_MAJOR}
        LINK_DEPENDS ${CMAKE_CURRENT_LIST_DIR}/${lib}.map
        LIBRARY_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/lib)
    target_link_options(${lib}_shared PRIVATE
        -Wl,--version-script=${CMAKE_CURRENT_LIST_DIR}/${lib}.map)
    # Every symbol resolved at link time, except under sanitizers (clang
    # leaves their runtime to the executable).
    if(NOT KVS_SAN_FLAGS)
        target_link_options(${lib}_shared PRIVATE -Wl,--no-undefined)
    endif()
    target_include_directories(${lib}_shared INTERFACE
        $<BUILD_INTERFACE:${CMAKE_SOURCE_DIR}/include>
        $<BUILD_INTERFACE:${CMAKE_SOURCE_DIR}/client>
        $<INSTALL_INTERFACE:${CMAKE_INSTALL_INCLUDEDIR}/kvstore>)
endforeach()

install(TARGETS kvstore_shared kvsclient_shared EXPORT kvstoreTargets
        LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR})
install(FILES ${CMAKE_SOURCE_DIR}/include/kvstore.h
              ${CMAKE_SOURCE_DIR}/include/kvs_common.h
              ${CMAKE_SOURCE_DIR}/client/kvs_client.h
        DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/kvstore)

# pkg-config: the prefix is found from the .pc file's own place, so that
# `cmake --install build --prefix P` works for any P.
file(RELATIVE_PATH KVS_PC_TO_PREFIX "/p/${CMAKE_INSTALL_LIBDIR}/pkgconfig" "/p")
foreach(pc kvstore kvsclient)
    configure_file(${CMAKE_CURRENT_LIST_DIR}/${pc}.pc.in
                   ${CMAKE_BINARY_DIR}/${pc}.pc @ONLY)
    install(FILES ${CMAKE_BINARY_DIR}/${pc}.pc
            DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)
endforeach()

set(kvs_cmake_dir ${CMAKE_INSTALL_LIBDIR}/cmake/kvstore)
install(EXPORT kvstoreTargets NAMESPACE kvstore:: DESTINATION ${kvs_cmake_dir})
configure_package_config_file(${CMAKE_CURRENT_LIST_DIR}/kvstoreConfig.cmake.in
    ${CMAKE_BINARY_DIR}/kvstoreConfig.cmake INSTALL_DESTINATION ${kvs_cmake_dir})
write_basic_package_version_file(${CMAKE_BINARY_DIR}/kvstoreConfigVersion.cmake
    COMPATIBILITY SameMajorVersion)
install(FILES ${CMAKE_BINARY_DIR}/kvstoreConfig.cmake
              ${CMAKE_BINARY_DIR}/kvstoreConfigVersion.cmake
        DESTINATION ${kvs_cmake_dir})
