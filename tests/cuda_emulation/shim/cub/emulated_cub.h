// The CUB algorithms dynseg's kernels call, for the CUDA emulator, with CUB's documented results: the
// radix sorts are stable and compare only the bits [begin_bit, end_bit) (so a key bound that is too
// tight shows as a wrong result here too); the scans are exact integer sums.
#pragma once
#include "../cuda_runtime.h"

namespace cub {
struct DeviceRadixSort {
    template <class K, class V>
    static cudaError_t SortPairs(void* temp, size_t& bytes, const K* keys_in, K* keys_out, const V* values_in,
                                 V* values_out, int n, int begin_bit = 0, int end_bit = sizeof(K) * 8,
                                 cudaStream_t = nullptr) {
        if (!temp) { bytes = 16; return cudaSuccess; }
        using U = std::make_unsigned_t<K>;
        const U mask = (end_bit - begin_bit >= int(sizeof(K) * 8)) ? U(~U(0)) : U((U(1) << (end_bit - begin_bit)) - 1);
        std::vector<int> order(n);
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
            return ((U(keys_in[a]) >> begin_bit) & mask) < ((U(keys_in[b]) >> begin_bit) & mask);
        });
        std::vector<K> k(n); std::vector<V> v(n);
        for (int i = 0; i < n; ++i) { k[i] = keys_in[order[i]]; v[i] = values_in[order[i]]; }
        std::copy(k.begin(), k.end(), keys_out); std::copy(v.begin(), v.end(), values_out);
        return cudaSuccess;
    }
};
struct DeviceScan {
    template <class In, class T>
    static cudaError_t InclusiveSum(void* temp, size_t& bytes, In in, T* out, int n, cudaStream_t = nullptr) {
        if (!temp) { bytes = 16; return cudaSuccess; }
        T s = 0;
        for (int i = 0; i < n; ++i) { s += in[i]; out[i] = s; }
        return cudaSuccess;
    }
};
template <class K, int BLOCK, int ITEMS>
class BlockRadixSort {
public:
    struct TempStorage { K items[BLOCK * ITEMS]; };
    explicit BlockRadixSort(TempStorage& t) : t_(t) {}
    void Sort(K (&keys)[ITEMS], int begin_bit = 0, int end_bit = sizeof(K) * 8) {
        const int t = threadIdx.x;
        for (int i = 0; i < ITEMS; ++i) t_.items[t * ITEMS + i] = keys[i];
        __syncthreads();
        if (t == 0) {
            using U = std::make_unsigned_t<K>;
            const U mask = (end_bit - begin_bit >= int(sizeof(K) * 8)) ? U(~U(0)) : U((U(1) << (end_bit - begin_bit)) - 1);
            std::stable_sort(t_.items, t_.items + BLOCK * ITEMS, [&](K a, K b) {
                return ((U(a) >> begin_bit) & mask) < ((U(b) >> begin_bit) & mask);
            });
        }
        __syncthreads();
        for (int i = 0; i < ITEMS; ++i) keys[i] = t_.items[t * ITEMS + i];
        __syncthreads();
    }
private:
    TempStorage& t_;
};
template <class T, int BLOCK>
class BlockScan {
public:
    struct TempStorage { T values[BLOCK]; };
    explicit BlockScan(TempStorage& t) : t_(t) {}
    void ExclusiveSum(T in, T& out, T& aggregate) {
        const int t = threadIdx.x;
        t_.values[t] = in;
        __syncthreads();
        T s = 0, all = 0;
        for (int u = 0; u < BLOCK; ++u) { if (u < t) s += t_.values[u]; all += t_.values[u]; }
        out = s; aggregate = all;
        __syncthreads();
    }
private:
    TempStorage& t_;
};
}  // namespace cub
