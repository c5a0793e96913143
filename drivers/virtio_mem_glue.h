/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The ABI between virtio_mem_glue.c and the Rust side of virtio_mem_rust: opaque pointers
 * and scalars only. glue.rs declares the same functions and mirrors the enums.
 */
#ifndef VIRTIO_MEM_RUST_GLUE_H
#define VIRTIO_MEM_RUST_GLUE_H

#include <linux/types.h>

struct device;
struct vmr_glue;

/* Implemented in Rust (glue.rs). */
int vmr_rs_probe(struct vmr_glue *glue, struct device *dev, void **rust);
void vmr_rs_remove(void *rust);
void vmr_rs_release(void *rust);
void vmr_rs_config_changed(void *rust);
void vmr_rs_work(void *rust);
void vmr_rs_stop_retry(void *rust);
int vmr_rs_memory_event(void *rust, unsigned int event, u64 start, u64 size, bool movable);

/* Memory notifier events and answers as the Rust side sees them (glue.rs mirrors these). */
enum vmr_mem_event {
	VMR_GOING_ONLINE,
	VMR_ONLINE,
	VMR_CANCEL_ONLINE,
	VMR_GOING_OFFLINE,
	VMR_OFFLINE,
	VMR_CANCEL_OFFLINE,
};
enum vmr_mem_answer { VMR_NOTIFY_OK, VMR_NOTIFY_BAD, VMR_NOTIFY_DONE };
int vmr_rs_serve_online_pages(void *rust, u64 addr, u64 size);
void vmr_rs_stop_serving_online_pages(void *rust);
int vmr_rs_freeze(void *rust, bool to_idle);
void vmr_rs_restore(void *rust);

/* PM notifier events as the Rust side sees them (glue.rs mirrors these); answered as above. */
enum vmr_pm_event { VMR_PM_HIBERNATION_PREPARE, VMR_PM_RESTORE_PREPARE, VMR_PM_OTHER };
int vmr_rs_pm_event(void *rust, unsigned int event);
bool vmr_rs_pfn_is_ram(void *rust, unsigned long pfn);
int vmr_rs_device_ram(void *rust, void *list);
ssize_t vmr_rs_show(void *rust, const char *name, char *buf, size_t size);
void vmr_rs_debugfs_init(void *rust, const char *name);
void vmr_rs_debugfs_exit(void *rust);

/* What keeps a page from being freed (status.rs's Holder mirrors these, same order). */
enum vmr_holder {
	VMR_HOLDER_SLAB,
	VMR_HOLDER_LARGE_KMALLOC,
	VMR_HOLDER_PINNED_USER,
	VMR_HOLDER_USER_EXTRA_REFS,
	VMR_HOLDER_PAGE_TABLE,
	VMR_HOLDER_RESERVED,
	VMR_HOLDER_MAPPED,
	VMR_HOLDER_KERNEL,
};

/* Implemented in virtio_mem_glue.c, called from Rust (glue.rs declares the same). */
struct vmr_raw_config;
void vmr_glue_read_config(struct vmr_glue *glue, struct vmr_raw_config *cfg);
bool vmr_glue_has_feature(struct vmr_glue *glue, unsigned int fbit);
bool vmr_glue_needs_reset(struct vmr_glue *glue);
int vmr_glue_request(struct vmr_glue *glue, const void *req, void *resp,
		     unsigned int timeout_ms, u32 *used_len);
void vmr_glue_kick(struct vmr_glue *glue);
u64 vmr_glue_memory_block_size(void);
u64 vmr_glue_pageblock_size(void);
void vmr_glue_pluggable_range(u64 *start, u64 *end);
int vmr_glue_node(struct vmr_glue *glue, u16 node_id, u64 addr);
int vmr_glue_hotplug_init(struct vmr_glue *glue, u64 addr, u64 size, int nid, u64 unit_bytes);
int vmr_glue_add_memory(struct vmr_glue *glue, u64 addr, u64 size);
void vmr_glue_online_pages(unsigned long pfn, unsigned int order);
unsigned long vmr_glue_page_to_pfn(const void *page);
void vmr_glue_keep_fake_offline(unsigned long pfn, unsigned long nr_pages);
void vmr_glue_fake_online(unsigned long pfn, unsigned long nr_pages);
void vmr_glue_going_offline(unsigned long pfn, unsigned long nr_pages);
void vmr_glue_cancel_offline(unsigned long pfn, unsigned long nr_pages);
int vmr_glue_fake_offline(unsigned long pfn, unsigned long nr_pages);
bool vmr_glue_is_movable(unsigned long pfn);
void vmr_glue_explain_busy(struct vmr_glue *glue, unsigned long pfn, unsigned long nr_pages);
int vmr_glue_find_holder(unsigned long pfn, unsigned long nr_pages);
u64 vmr_glue_pages_migrated(void);
u64 vmr_glue_now_ns(void);
int vmr_glue_auto_online(void);
void vmr_glue_trace_request(struct vmr_glue *glue, u16 type, u64 addr, u16 nb_blocks,
			    u32 answer, u64 ns);
void vmr_glue_trace_round(struct vmr_glue *glue, u64 requested, u64 before, u64 after,
			  const char *stop);
void vmr_glue_trace_unplug_online(struct vmr_glue *glue, unsigned long pfn,
				  unsigned long nr_pages, int result, u64 ns);
int vmr_glue_offline_and_remove(u64 addr, u64 size);
bool vmr_glue_drop_slab(void);
void vmr_glue_mem_info(u64 *available, u64 *total, u64 *slab_reclaimable, u64 *active_file);
bool vmr_glue_unplug_online(void);
void vmr_glue_mode_params(bool *force, u64 *block_size);
bool vmr_glue_in_kdump(struct vmr_glue *glue);
bool vmr_glue_has_vmcore(void);
bool vmr_glue_freezing(void);
int vmr_glue_vmcore_add_range(void *list, u64 start, u64 size);
int vmr_glue_register_driver(void);
void vmr_glue_unregister_driver(void);

#endif /* VIRTIO_MEM_RUST_GLUE_H */
