/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Trace events of virtio_mem_rust (tracefs: events/virtio_mem_rust/). The C glue defines
 * them (virtio_mem_glue.c); the Rust side fires them through vmr_glue_trace_*().
 */
#undef TRACE_SYSTEM
#define TRACE_SYSTEM virtio_mem_rust

#if !defined(_VIRTIO_MEM_RUST_TRACE_H) || defined(TRACE_HEADER_MULTI_READ)
#define _VIRTIO_MEM_RUST_TRACE_H

#include <linux/tracepoint.h>

/* Request types as the device protocol numbers them; answers as the driver counts them. */
#define VMR_SHOW_REQUEST(t)                                                             \
	__print_symbolic(t, { 0, "PLUG" }, { 1, "UNPLUG" }, { 2, "UNPLUG_ALL" },        \
			 { 3, "STATE" })
#define VMR_SHOW_ANSWER(a)                                                              \
	__print_symbolic(a, { 0, "ACK" }, { 1, "NACK" }, { 2, "BUSY" }, { 3, "ERROR" }, \
			 { 4, "invalid" }, { 5, "timeout" })

/* One request and its answer, with the time it was in flight. */
TRACE_EVENT(virtio_mem_rust_request,
	TP_PROTO(const char *dev, u16 type, u64 addr, u16 nb_blocks, u32 answer, u64 usecs),
	TP_ARGS(dev, type, addr, nb_blocks, answer, usecs),
	TP_STRUCT__entry(
		__string(dev, dev)
		__field(u16, type)
		__field(u64, addr)
		__field(u16, nb_blocks)
		__field(u32, answer)
		__field(u64, usecs)
	),
	TP_fast_assign(
		__assign_str(dev);
		__entry->type = type;
		__entry->addr = addr;
		__entry->nb_blocks = nb_blocks;
		__entry->answer = answer;
		__entry->usecs = usecs;
	),
	TP_printk("%s %s addr=%#llx nb_blocks=%u answer=%s usecs=%llu", __get_str(dev),
		  VMR_SHOW_REQUEST(__entry->type), __entry->addr, __entry->nb_blocks,
		  VMR_SHOW_ANSWER(__entry->answer), __entry->usecs)
);

/* One round of the worker: the requested size, plugged before and after, why it stopped. */
TRACE_EVENT(virtio_mem_rust_round,
	TP_PROTO(const char *dev, u64 requested, u64 before, u64 after, const char *stop),
	TP_ARGS(dev, requested, before, after, stop),
	TP_STRUCT__entry(
		__string(dev, dev)
		__field(u64, requested)
		__field(u64, before)
		__field(u64, after)
		__string(stop, stop)
	),
	TP_fast_assign(
		__assign_str(dev);
		__entry->requested = requested;
		__entry->before = before;
		__entry->after = after;
		__assign_str(stop);
	),
	TP_printk("%s requested=%#llx before=%#llx after=%#llx stop=%s", __get_str(dev),
		  __entry->requested, __entry->before, __entry->after, __get_str(stop))
);

/* One try to take online pages from the kernel (alloc_contig_range). */
TRACE_EVENT(virtio_mem_rust_unplug_online,
	TP_PROTO(const char *dev, u64 start, u64 size, int result, u64 usecs),
	TP_ARGS(dev, start, size, result, usecs),
	TP_STRUCT__entry(
		__string(dev, dev)
		__field(u64, start)
		__field(u64, size)
		__field(int, result)
		__field(u64, usecs)
	),
	TP_fast_assign(
		__assign_str(dev);
		__entry->start = start;
		__entry->size = size;
		__entry->result = result;
		__entry->usecs = usecs;
	),
	TP_printk("%s start=%#llx size=%#llx result=%d usecs=%llu", __get_str(dev),
		  __entry->start, __entry->size, __entry->result, __entry->usecs)
);

#endif /* _VIRTIO_MEM_RUST_TRACE_H */

#undef TRACE_INCLUDE_PATH
#define TRACE_INCLUDE_PATH .
#undef TRACE_INCLUDE_FILE
#define TRACE_INCLUDE_FILE virtio_mem_rust_trace
#include <trace/define_trace.h>
