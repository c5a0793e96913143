// SPDX-License-Identifier: GPL-2.0
/*
 * C glue of virtio_mem_rust: only what Rust cannot reach in Linux 7.2.
 *
 * - the virtio driver (device and feature tables, probe/remove/config_changed,
 *   freeze/restore, the virtqueue and the wait for a response, virtio_cread_le for the
 *   config);
 * - kernel callbacks that need a C object: the memory notifier, the PM notifier, the vmcore
 *   callbacks of a crash kernel; the worker thread, its kick and its wait (kicked in
 *   interrupt context: see vmr_glue_kick(); no kthread abstraction in 7.2);
 * - page flag helpers and page_to_pfn() (inline functions, macros) and a few constants.
 *
 * The ABI towards Rust is opaque pointers and scalars, declared once on the Rust side in
 * glue.rs. All logic (validation, state, planning) lives in Rust.
 *
 * Lifetime: a struct vmr_glue lives from probe to remove. Its `rust` pointer is the
 * driver's state, handed over by vmr_rs_probe() and given back with vmr_rs_release() once
 * nothing can call into it any more.
 */
#include <linux/crash_dump.h>
#include <linux/device.h>
#include <linux/ioport.h>
#include <linux/freezer.h>
#include <linux/jiffies.h>
#include <linux/ktime.h>
#include <linux/kthread.h>
#include <linux/memory.h>
#include <linux/memory_hotplug.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/numa.h>
#include <linux/page-flags.h>
#include <linux/scatterlist.h>
#include <linux/slab.h>
#include <linux/suspend.h>
#include <linux/virtio.h>
#include <linux/virtio_config.h>
#include <linux/vmstat.h>
#include <linux/wait.h>
#include <linux/workqueue.h>
#include <acpi/acpi_numa.h>

#include "../include-uapi/linux/virtio_mem.h"
#include "virtio_mem_glue.h"

#define CREATE_TRACE_POINTS
#include "virtio_mem_rust_trace.h"

struct vmr_glue {
	struct virtio_device *vdev;
	/* NULL between freeze and restore (the Rust side sends nothing then). */
	struct virtqueue *vq;
	wait_queue_head_t host_resp;
	/* Device-readable and device-writable buffers: never on the stack. */
	struct virtio_mem_req req;
	struct virtio_mem_resp resp;
	/* A request whose buffers the device still owns (timed out): never reuse them. */
	bool request_lost;
	/*
	 * The device set VIRTIO_CONFIG_S_NEEDS_RESET: it answers no request until it is
	 * reset, which only remove does. Set once seen, never cleared.
	 */
	bool needs_reset;

	/*
	 * The worker: a freezable kthread of the device's own, created at probe, so that
	 * (un)plugging never occupies a workqueue pool's worker. A busy pool spawns a new
	 * kworker, whose stack then lands in the memory just added and pins it for good.
	 * `kick` asks it to run (glue.rs's retry timer kicks it after a delay).
	 */
	struct task_struct *thread;
	wait_queue_head_t thread_wq;
	bool kick;
	/* Set before stopping the worker: nothing kicks it, no request waits any more. */
	bool removing;

	struct notifier_block memory_notifier;
	bool notifier_registered;
	/* Vetoes hibernation while the device is bound. */
	struct notifier_block pm_notifier;
	bool pm_notifier_registered;
	/* is_kdump_kernel() at probe: nothing is plugged, unplugged or added. */
	bool kdump;
#ifdef CONFIG_PROC_VMCORE
	/* In a crash kernel: what of the region /proc/vmcore may read. */
	struct vmcore_cb vmcore_cb;
	bool vmcore_registered;
#endif
	struct resource *parent_resource;
	int mgid;
	bool on_device_list;
	bool sysfs_group;
	u64 addr, size;

	void *rust;
};

static bool unplug_online = true;
module_param(unplug_online, bool, 0644);
MODULE_PARM_DESC(unplug_online, "Try to unplug online memory");

static bool force_bbm;
module_param(force_bbm, bool, 0444);
MODULE_PARM_DESC(force_bbm,
		 "Force Big Block Mode. Default is 0 (auto-selection)");

static unsigned long bbm_block_size;
module_param(bbm_block_size, ulong, 0444);
MODULE_PARM_DESC(bbm_block_size,
		 "Big Block size in bytes. Default is 0 (auto-detection).");

/* ---- the online page callback and the memory notifier ---------------------------------- */

/* For glue.rs's online page callback: page_to_pfn() is a macro. */
unsigned long vmr_glue_page_to_pfn(const void *page)
{
	return page_to_pfn((const struct page *)page);
}

static int vmr_memory_notifier_cb(struct notifier_block *nb, unsigned long action, void *arg)
{
	struct vmr_glue *glue = container_of(nb, struct vmr_glue, memory_notifier);
	const struct memory_notify *mhp = arg;
	const u64 start = PFN_PHYS(mhp->start_pfn);
	const u64 size = PFN_PHYS(mhp->nr_pages);
	bool movable = false;
	unsigned int event;

	if (start + size <= glue->addr || start >= glue->addr + glue->size)
		return NOTIFY_DONE;
	switch (action) {
	case MEM_GOING_ONLINE:
		event = VMR_GOING_ONLINE;
		break;
	case MEM_ONLINE:
		event = VMR_ONLINE;
		break;
	case MEM_CANCEL_ONLINE:
		event = VMR_CANCEL_ONLINE;
		break;
	case MEM_GOING_OFFLINE:
		event = VMR_GOING_OFFLINE;
		break;
	case MEM_OFFLINE:
		event = VMR_OFFLINE;
		break;
	case MEM_CANCEL_OFFLINE:
		event = VMR_CANCEL_OFFLINE;
		break;
	default:
		return NOTIFY_DONE;
	}
	if (event == VMR_ONLINE)
		movable = is_zone_movable_page(pfn_to_page(mhp->start_pfn));
	switch (vmr_rs_memory_event(glue->rust, event, start, size, movable)) {
	case VMR_NOTIFY_OK:
		return NOTIFY_OK;
	case VMR_NOTIFY_DONE:
		return NOTIFY_DONE;
	default:
		return NOTIFY_BAD;
	}
}

/* ---- called from Rust ------------------------------------------------------------------ */

/* Config space, read with virtio_cread_le (the whole struct, field by field). */
struct vmr_raw_config {
	u64 block_size;
	u64 addr;
	u64 region_size;
	u64 usable_region_size;
	u64 plugged_size;
	u64 requested_size;
	u16 node_id;
};

void vmr_glue_read_config(struct vmr_glue *glue, struct vmr_raw_config *cfg)
{
	struct virtio_device *vdev = glue->vdev;

	virtio_cread_le(vdev, struct virtio_mem_config, block_size, &cfg->block_size);
	virtio_cread_le(vdev, struct virtio_mem_config, node_id, &cfg->node_id);
	virtio_cread_le(vdev, struct virtio_mem_config, addr, &cfg->addr);
	virtio_cread_le(vdev, struct virtio_mem_config, region_size, &cfg->region_size);
	virtio_cread_le(vdev, struct virtio_mem_config, usable_region_size,
			&cfg->usable_region_size);
	virtio_cread_le(vdev, struct virtio_mem_config, plugged_size, &cfg->plugged_size);
	virtio_cread_le(vdev, struct virtio_mem_config, requested_size, &cfg->requested_size);
}

bool vmr_glue_has_feature(struct vmr_glue *glue, unsigned int fbit)
{
	return virtio_has_feature(glue->vdev, fbit);
}

/*
 * Whether the device set VIRTIO_CONFIG_S_NEEDS_RESET (QEMU's virtio_error(): it stops
 * processing the queue). The status is read until it is seen, then remembered. Any
 * context, as the config change callback asks too: get_status() of the transports an
 * x86-64 guest has (virtio-pci, -mmio, -vdpa) reads a register or a field.
 */
bool vmr_glue_needs_reset(struct vmr_glue *glue)
{
	struct virtio_device *vdev = glue->vdev;

	if (!READ_ONCE(glue->needs_reset) &&
	    vdev->config->get_status(vdev) & VIRTIO_CONFIG_S_NEEDS_RESET)
		WRITE_ONCE(glue->needs_reset, true);
	return READ_ONCE(glue->needs_reset);
}

/*
 * Whether the wait for an answer is over: it came (*answered, with its length in *len), or
 * it never will (the device is going away, or needs a reset).
 */
static bool vmr_wait_over(struct vmr_glue *glue, unsigned int *len, bool *answered)
{
	*answered = virtqueue_get_buf(glue->vq, len);
	return *answered || READ_ONCE(glue->removing) || READ_ONCE(glue->needs_reset);
}

/*
 * Sends one request and waits at most timeout_ms for the answer. The Rust side encodes the
 * request (struct virtio_mem_req, little endian) and fills the response buffer
 * (struct virtio_mem_resp) with what a field the device does not write must read as; both
 * are copied to and from the glue's DMA-able buffers unchanged. Returns 0 with the used
 * length, -ETIMEDOUT (the buffers stay the device's: every later request fails with -EIO),
 * -ENODEV while removing, -ECONNRESET as soon as the device needs a reset (seen by the
 * config change callback, which wakes this wait), or the virtqueue's error.
 */
int vmr_glue_request(struct vmr_glue *glue, const void *req, void *resp,
		     unsigned int timeout_ms, u32 *used_len)
{
	struct scatterlist *sgs[2], sg_req, sg_resp;
	unsigned int len = 0;
	bool answered = false;
	int rc;

	if (glue->request_lost)
		return -EIO;
	if (READ_ONCE(glue->needs_reset))
		return -ECONNRESET;
	/* Frozen: the queue is gone (the Rust side does not send then; never touch it). */
	if (!glue->vq)
		return -ESHUTDOWN;

	memcpy(&glue->req, req, sizeof(glue->req));
	memcpy(&glue->resp, resp, sizeof(glue->resp));

	sg_init_one(&sg_req, &glue->req, sizeof(glue->req));
	sgs[0] = &sg_req;
	sg_init_one(&sg_resp, &glue->resp, sizeof(glue->resp));
	sgs[1] = &sg_resp;

	rc = virtqueue_add_sgs(glue->vq, sgs, 1, 1, glue, GFP_KERNEL);
	if (rc < 0)
		return rc;
	virtqueue_kick(glue->vq);

	wait_event_timeout(glue->host_resp, vmr_wait_over(glue, &len, &answered),
			   msecs_to_jiffies(timeout_ms));
	/* One last look: the answer may have come with the timeout. */
	if (!answered)
		answered = virtqueue_get_buf(glue->vq, &len);
	if (!answered) {
		/* The device keeps the buffers. */
		glue->request_lost = true;
		if (READ_ONCE(glue->needs_reset))
			return -ECONNRESET;
		return READ_ONCE(glue->removing) ? -ENODEV : -ETIMEDOUT;
	}

	memcpy(resp, &glue->resp, sizeof(glue->resp));
	*used_len = len;
	return 0;
}

/*
 * Asks the worker for a round, unless the device is going away. Any context: a config
 * change and glue.rs's retry timer kick it in interrupt context, where no lock of Rust's
 * may be taken. wait_event_freezable() sets the task state before it checks `kick`, so no
 * kick is lost; a kick that races with remove wakes a thread that is stopping.
 */
void vmr_glue_kick(struct vmr_glue *glue)
{
	if (READ_ONCE(glue->removing))
		return;
	WRITE_ONCE(glue->kick, true);
	wake_up(&glue->thread_wq);
}

u64 vmr_glue_memory_block_size(void)
{
	return memory_block_size_bytes();
}

u64 vmr_glue_pageblock_size(void)
{
	return PAGE_SIZE * pageblock_nr_pages;
}

void vmr_glue_pluggable_range(u64 *start, u64 *end)
{
	const struct range r = mhp_get_pluggable_range(true);

	*start = r.start;
	*end = r.end;
}

/* The node of the device's memory: from the ACPI PXM if the device gives one, else the address. */
int vmr_glue_node(struct vmr_glue *glue, u16 node_id, u64 addr)
{
	int nid = NUMA_NO_NODE;

#if defined(CONFIG_NUMA) && defined(CONFIG_ACPI_NUMA)
	if (virtio_has_feature(glue->vdev, VIRTIO_MEM_F_ACPI_PXM))
		nid = pxm_to_node(node_id);
#endif
	if (nid == NUMA_NO_NODE)
		nid = memory_add_physaddr_to_nid(addr);
	return nid;
}

/*
 * Takes the device's region for Linux: the parent resource (named after the device,
 * system RAM, exclusive, not busy), the dynamic memory group, the memory notifier and the
 * online page callback. Returns 0 or a negative errno; undone by vmr_glue_hotplug_exit().
 */
int vmr_glue_hotplug_init(struct vmr_glue *glue, u64 addr, u64 size, int nid, u64 unit_bytes)
{
	const char *name;
	int rc;

	name = kstrdup(dev_name(&glue->vdev->dev), GFP_KERNEL);
	if (!name)
		return -ENOMEM;
	glue->parent_resource = __request_mem_region(addr, size, name,
						     IORESOURCE_SYSTEM_RAM | IORESOURCE_EXCLUSIVE);
	if (!glue->parent_resource) {
		kfree(name);
		return -EBUSY;
	}
	/* Not actually busy: add_memory() adds its children. /dev/mem stays excluded. */
	glue->parent_resource->flags &= ~IORESOURCE_BUSY;
	glue->addr = addr;
	glue->size = size;

	rc = memory_group_register_dynamic(nid, PHYS_PFN(unit_bytes));
	if (rc < 0)
		goto out_resource;
	glue->mgid = rc;

	glue->memory_notifier.notifier_call = vmr_memory_notifier_cb;
	rc = register_memory_notifier(&glue->memory_notifier);
	if (rc)
		goto out_group;
	glue->notifier_registered = true;

	rc = vmr_rs_serve_online_pages(glue->rust, addr, size);
	if (rc)
		goto out_notifier;
	glue->on_device_list = true;
	return glue->mgid;

out_notifier:
	unregister_memory_notifier(&glue->memory_notifier);
	glue->notifier_registered = false;
out_group:
	memory_group_unregister(glue->mgid);
out_resource:
	name = glue->parent_resource->name;
	release_resource(glue->parent_resource);
	kfree(glue->parent_resource);
	kfree(name);
	glue->parent_resource = NULL;
	return rc;
}

static int vmr_has_system_ram(struct resource *res, void *arg)
{
	return 1;
}

/*
 * Gives the region back. Memory still added (online memory cannot always be removed)
 * keeps the resource and the group, with a warning, as the C driver does.
 */
static void vmr_glue_hotplug_exit(struct vmr_glue *glue)
{
	const char *name;

	if (glue->on_device_list) {
		vmr_rs_stop_serving_online_pages(glue->rust);
		glue->on_device_list = false;
	}
	if (glue->notifier_registered) {
		unregister_memory_notifier(&glue->memory_notifier);
		glue->notifier_registered = false;
	}
	if (!glue->parent_resource)
		return;
	if (walk_iomem_res_desc(IORES_DESC_NONE, IORESOURCE_SYSTEM_RAM | IORESOURCE_BUSY,
				glue->addr, glue->addr + glue->size - 1, NULL,
				vmr_has_system_ram) == 1) {
		dev_warn(&glue->vdev->dev, "device still has system memory added\n");
		return;
	}
	memory_group_unregister(glue->mgid);
	name = glue->parent_resource->name;
	release_resource(glue->parent_resource);
	kfree(glue->parent_resource);
	kfree(name);
	glue->parent_resource = NULL;
}

int vmr_glue_add_memory(struct vmr_glue *glue, u64 addr, u64 size)
{
	return add_memory_driver_managed(glue->mgid, addr, size, "System RAM (virtio_mem)",
					 MHP_MERGE_RESOURCE | MHP_NID_IS_MGID);
}

/* Plugged pages that core mm is onlining go to the buddy. */
void vmr_glue_online_pages(unsigned long pfn, unsigned int order)
{
	generic_online_page(pfn_to_page(pfn), order);
}

/*
 * Pages of a memory block being onlined start PageOffline. Those of unplugged subblocks
 * stay so; PageDirty remembers that they never went through generic_online_page().
 */
void vmr_glue_keep_fake_offline(unsigned long pfn, unsigned long nr_pages)
{
	page_offline_begin();
	for (; nr_pages--; pfn++) {
		struct page *page = pfn_to_page(pfn);

		SetPageDirty(page);
		VM_WARN_ON_ONCE(!PageOffline(page));
	}
	page_offline_end();
}

/* Gives fake-offline pages (now plugged) to the buddy. */
void vmr_glue_fake_online(unsigned long pfn, unsigned long nr_pages)
{
	unsigned int order = MAX_PAGE_ORDER;
	unsigned long i, j;

	while (!IS_ALIGNED(pfn | nr_pages, 1UL << order))
		order--;

	for (i = 0; i < nr_pages; i += 1UL << order) {
		struct page *page = pfn_to_page(pfn + i);

		if (PageDirty(page)) {
			/* Never onlined: generic_online_page() clears PageOffline. */
			for (j = 0; j < 1UL << order; j++)
				ClearPageDirty(pfn_to_page(pfn + i + j));
			generic_online_page(page, order);
		} else {
			for (j = 0; j < 1UL << order; j++)
				__ClearPageOffline(pfn_to_page(pfn + i + j));
			free_contig_range(pfn + i, 1UL << order);
			adjust_managed_page_count(page, 1L << order);
		}
	}
}

/*
 * One try to take plugged, online pages away from the kernel: allocate them (migrating
 * what is there), mark them PageOffline and drop them from the managed page count.
 * Returns 0, -EBUSY (something could not move), -ENOMEM or another error.
 *
 * The pages migrated away need new pages elsewhere: __GFP_RETRY_MAYFAIL lets that fail
 * rather than call the OOM killer, and __GFP_NOWARN keeps a failure out of the log as a
 * "page allocation failure" report (the worker retries, and says why in its own words).
 */
int vmr_glue_fake_offline(unsigned long pfn, unsigned long nr_pages)
{
	unsigned long i;
	int rc;

	rc = alloc_contig_range(pfn, pfn + nr_pages, ACR_FLAGS_NONE,
				GFP_KERNEL | __GFP_RETRY_MAYFAIL | __GFP_NOWARN);
	if (rc)
		return rc;
	page_offline_begin();
	for (i = 0; i < nr_pages; i++)
		__SetPageOffline(pfn_to_page(pfn + i));
	page_offline_end();
	adjust_managed_page_count(pfn_to_page(pfn), -(long)nr_pages);
	return 0;
}

/*
 * What keeps [pfn, pfn + nr_pages) from being freed: the first page that is in use and not
 * ours, and either not on an LRU list (not movable) or held there by a pin or references
 * beyond its mappings. Returns its enum vmr_holder and sets *holder_pfn, or -1 if every
 * page in use is movable.
 */
static int vmr_find_holder(unsigned long pfn, unsigned long nr_pages,
			   unsigned long *holder_pfn)
{
	unsigned long i;

	for (i = 0; i < nr_pages; i++) {
		struct page *page = pfn_to_page(pfn + i);
		struct folio *folio;
		int kind;

		if (PageBuddy(page) || PageOffline(page))
			continue;
		folio = page_folio(page);
		/*
		 * Slab pages and large kmallocs have refcount 0 on this kernel (7.2), as have
		 * free pages on the per-CPU lists: name the former before skipping the latter.
		 */
		if (folio_test_slab(folio)) {
			kind = VMR_HOLDER_SLAB;
		} else if (folio_test_large_kmalloc(folio)) {
			kind = VMR_HOLDER_LARGE_KMALLOC;
		} else if (folio_test_lru(folio)) {
			if (folio_maybe_dma_pinned(folio))
				kind = VMR_HOLDER_PINNED_USER;
			/* An anonymous page holds a reference per mapping (and the swap cache's). */
			else if (folio_test_anon(folio) &&
				 folio_ref_count(folio) > folio_mapcount(folio) +
				 (folio_test_swapcache(folio) ? folio_nr_pages(folio) : 0))
				kind = VMR_HOLDER_USER_EXTRA_REFS;
			else
				continue;
		} else if (!folio_ref_count(folio)) {
			continue;
		} else if (PageTable(page)) {
			kind = VMR_HOLDER_PAGE_TABLE;
		} else if (PageReserved(page)) {
			kind = VMR_HOLDER_RESERVED;
		} else if (folio_mapped(folio)) {
			kind = VMR_HOLDER_MAPPED;
		} else {
			kind = VMR_HOLDER_KERNEL;
		}
		*holder_pfn = pfn + i;
		return kind;
	}
	return -1;
}

int vmr_glue_find_holder(unsigned long pfn, unsigned long nr_pages)
{
	unsigned long holder;

	return vmr_find_holder(pfn, nr_pages, &holder);
}

/* Says in the log what keeps [pfn, pfn + nr_pages) from being freed, with dump_page(). */
void vmr_glue_explain_busy(struct vmr_glue *glue, unsigned long pfn, unsigned long nr_pages)
{
	static const char * const kinds[] = {
		[VMR_HOLDER_SLAB] = "a slab page",
		[VMR_HOLDER_LARGE_KMALLOC] = "a large kmalloc",
		[VMR_HOLDER_PINNED_USER] = "a pinned user page",
		[VMR_HOLDER_USER_EXTRA_REFS] =
			"a user page with extra references (spliced into a pipe, I/O in flight)",
		[VMR_HOLDER_PAGE_TABLE] = "a page table",
		[VMR_HOLDER_RESERVED] = "a reserved page",
		[VMR_HOLDER_MAPPED] = "a mapped page not on an LRU list",
		[VMR_HOLDER_KERNEL] = "a kernel allocation (e.g. a kernel stack)",
	};
	unsigned long holder;
	struct page *page;
	int kind;

	kind = vmr_find_holder(pfn, nr_pages, &holder);
	if (kind < 0) {
		dev_info(&glue->vdev->dev, "pfns %#lx..%#lx: nothing unmovable left; retrying\n",
			 pfn, pfn + nr_pages - 1);
		return;
	}
	page = pfn_to_page(holder);
	dev_info(&glue->vdev->dev, "pfn %#lx (%#llx) holds the memory: %s, refcount %d\n",
		 holder, (u64)PFN_PHYS(holder), kinds[kind], folio_ref_count(page_folio(page)));
	dump_page(page, "virtio_mem_rust: keeps memory from being unplugged");
}

/*
 * Pages core mm migrated since boot (pgmigrate_success), summed without the CPU hotplug
 * lock (the worker holds its mutex, which memory hotplug takes under that lock).
 */
u64 vmr_glue_pages_migrated(void)
{
#if defined(CONFIG_VM_EVENT_COUNTERS) && defined(CONFIG_MIGRATION)
	u64 sum = 0;
	int cpu;

	for_each_possible_cpu(cpu)
		sum += per_cpu(vm_event_states, cpu).event[PGMIGRATE_SUCCESS];
	return sum;
#else
	return 0;
#endif
}

u64 vmr_glue_now_ns(void)
{
	return ktime_get_ns();
}

/* 1 if core mm onlines hot-added memory itself, 0 if not, -1 if a module cannot ask. */
int vmr_glue_auto_online(void)
{
#ifdef MODULE
	return -1;
#else
	return mhp_get_default_online_type() != MMOP_OFFLINE;
#endif
}

void vmr_glue_trace_request(struct vmr_glue *glue, u16 type, u64 addr, u16 nb_blocks,
			    u32 answer, u64 ns)
{
	trace_virtio_mem_rust_request(dev_name(&glue->vdev->dev), type, addr, nb_blocks, answer,
				      div_u64(ns, NSEC_PER_USEC));
}

void vmr_glue_trace_round(struct vmr_glue *glue, u64 requested, u64 before, u64 after,
			  const char *stop)
{
	trace_virtio_mem_rust_round(dev_name(&glue->vdev->dev), requested, before, after, stop);
}

void vmr_glue_trace_unplug_online(struct vmr_glue *glue, unsigned long pfn,
				  unsigned long nr_pages, int result, u64 ns)
{
	trace_virtio_mem_rust_unplug_online(dev_name(&glue->vdev->dev), PFN_PHYS(pfn),
					    PFN_PHYS(nr_pages), result,
					    div_u64(ns, NSEC_PER_USEC));
}

bool vmr_glue_is_movable(unsigned long pfn)
{
	return is_zone_movable_page(pfn_to_page(pfn));
}

int vmr_glue_offline_and_remove(u64 addr, u64 size)
{
	return offline_and_remove_memory(addr, size);
}

/*
 * Frees reclaimable slab objects (dentries, inodes, ...) that may pin pages of memory to
 * unplug. drop_slab() is not exported: only the built-in driver can call it.
 */
bool vmr_glue_drop_slab(void)
{
#ifdef MODULE
	return false;
#else
	drop_slab();
	return true;
#endif
}

/* What the guest has now, in bytes: MemAvailable, MemTotal, SReclaimable, Active(file). */
void vmr_glue_mem_info(u64 *available, u64 *total, u64 *slab_reclaimable, u64 *active_file)
{
	long avail = si_mem_available();

	*available = avail > 0 ? (u64)avail << PAGE_SHIFT : 0;
	*total = (u64)totalram_pages() << PAGE_SHIFT;
	*slab_reclaimable = (u64)global_node_page_state_pages(NR_SLAB_RECLAIMABLE_B) << PAGE_SHIFT;
	*active_file = (u64)global_node_page_state(NR_ACTIVE_FILE) << PAGE_SHIFT;
}

bool vmr_glue_unplug_online(void)
{
	return READ_ONCE(unplug_online);
}

void vmr_glue_mode_params(bool *force, u64 *block_size)
{
	*force = force_bbm;
	*block_size = bbm_block_size;
}

bool vmr_glue_in_kdump(struct vmr_glue *glue)
{
	return glue->kdump;
}

bool vmr_glue_has_vmcore(void)
{
	return IS_ENABLED(CONFIG_PROC_VMCORE);
}

/* Whether the worker (the caller) is asked to freeze: system sleep is on its way. */
bool vmr_glue_freezing(void)
{
	return freezing(current);
}

/* For vmr_rs_device_ram(): one more plugged range for /proc/vmcore, on the caller's list. */
int vmr_glue_vmcore_add_range(void *list, u64 start, u64 size)
{
#ifdef CONFIG_PROC_VMCORE
	return vmcore_alloc_add_range(list, start, size);
#else
	return -EOPNOTSUPP;
#endif
}

/* Memory with fake-offline pages goes offline: drop our references so mm can skip them. */
void vmr_glue_going_offline(unsigned long pfn, unsigned long nr_pages)
{
	for (; nr_pages--; pfn++) {
		struct page *page = pfn_to_page(pfn);

		if (WARN_ON(!page_ref_dec_and_test(page)))
			dump_page(page, "fake-offline page referenced");
	}
}

/* Offlining was cancelled: take the references back. */
void vmr_glue_cancel_offline(unsigned long pfn, unsigned long nr_pages)
{
	for (; nr_pages--; pfn++)
		page_ref_inc(pfn_to_page(pfn));
}

/* ---- the virtio driver ----------------------------------------------------------------- */

static void vmr_vq_done(struct virtqueue *vq)
{
	struct vmr_glue *glue = vq->vdev->priv;

	wake_up(&glue->host_resp);
}

static int vmr_thread_fn(void *data)
{
	struct vmr_glue *glue = data;

	set_freezable();
	while (!kthread_should_stop()) {
		wait_event_freezable(glue->thread_wq,
				     READ_ONCE(glue->kick) || kthread_should_stop());
		if (kthread_should_stop())
			break;
		/*
		 * A round asked to freeze stops between requests and kicks again:
		 * freeze here (wait_event_freezable() does not while kicked), run
		 * after the thaw.
		 */
		if (try_to_freeze())
			continue;
		/* Cleared before the run: a kick during it makes another run. */
		WRITE_ONCE(glue->kick, false);
		vmr_rs_work(glue->rust);
	}
	return 0;
}

/* Hibernation and restoring an image are refused while a device is bound (see device.rs). */
static int vmr_pm_notifier_cb(struct notifier_block *nb, unsigned long action, void *arg)
{
	struct vmr_glue *glue = container_of(nb, struct vmr_glue, pm_notifier);
	unsigned int event;

	switch (action) {
	case PM_HIBERNATION_PREPARE:
		event = VMR_PM_HIBERNATION_PREPARE;
		break;
	case PM_RESTORE_PREPARE:
		event = VMR_PM_RESTORE_PREPARE;
		break;
	default:
		event = VMR_PM_OTHER;
		break;
	}
	return vmr_rs_pm_event(glue->rust, event) == VMR_NOTIFY_OK ? NOTIFY_OK : NOTIFY_BAD;
}

#ifdef CONFIG_PROC_VMCORE
static bool vmr_vmcore_pfn_is_ram(struct vmcore_cb *cb, unsigned long pfn)
{
	struct vmr_glue *glue = container_of(cb, struct vmr_glue, vmcore_cb);

	return vmr_rs_pfn_is_ram(glue->rust, pfn);
}

/* The plugged ranges of the region: all of them on @list, or none and an error. */
static int vmr_vmcore_get_device_ram(struct vmcore_cb *cb, struct list_head *list)
{
	struct vmr_glue *glue = container_of(cb, struct vmr_glue, vmcore_cb);
	LIST_HEAD(ranges);
	int rc;

	rc = vmr_rs_device_ram(glue->rust, &ranges);
	if (rc) {
		vmcore_free_ranges(&ranges);
		return rc;
	}
	list_splice_tail(&ranges, list);
	return 0;
}
#endif

/*
 * In a crash kernel, once the device is ready: /proc/vmcore asks the Rust side what of the
 * region is RAM (and, with CONFIG_PROC_VMCORE_DEVICE_RAM, which ranges to dump: asked at
 * once). Without CONFIG_PROC_VMCORE the Rust side refused the device at probe.
 */
static void vmr_register_vmcore(struct vmr_glue *glue)
{
#ifdef CONFIG_PROC_VMCORE
	glue->vmcore_cb.pfn_is_ram = vmr_vmcore_pfn_is_ram;
	if (IS_ENABLED(CONFIG_PROC_VMCORE_DEVICE_RAM))
		glue->vmcore_cb.get_device_ram = vmr_vmcore_get_device_ram;
	register_vmcore_cb(&glue->vmcore_cb);
	glue->vmcore_registered = true;
#endif
}

static void vmr_unregister_vmcore(struct vmr_glue *glue)
{
#ifdef CONFIG_PROC_VMCORE
	if (glue->vmcore_registered)
		unregister_vmcore_cb(&glue->vmcore_cb);
	glue->vmcore_registered = false;
#endif
}

/* Undoes vmr_rs_probe() when probe fails after it (the worker never ran). */
/* ---- sysfs: the virtio_mem group of the virtio device ---------------------------------- */

/*
 * One value per file, formatted by the Rust side from its last published snapshot (never
 * waits on a device request). The names are the Rust side's (status.rs), which it looks up:
 * Documentation/ABI/testing/sysfs-bus-virtio-drivers-virtio_mem_rust documents each.
 */
static ssize_t vmr_attr_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	struct vmr_glue *glue = dev_to_virtio(dev)->priv;

	return vmr_rs_show(glue->rust, attr->attr.name, buf, PAGE_SIZE);
}

#define VMR_ATTR(_name) \
	static struct device_attribute vmr_attr_##_name = __ATTR(_name, 0444, vmr_attr_show, NULL)
VMR_ATTR(region_start);
VMR_ATTR(region_size);
VMR_ATTR(usable_region_size);
VMR_ATTR(block_size);
VMR_ATTR(subblock_size);
VMR_ATTR(memory_block_size);
VMR_ATTR(mode);
VMR_ATTR(node);
VMR_ATTR(requested_size);
VMR_ATTR(plugged_size);
VMR_ATTR(device_plugged_size);
VMR_ATTR(online_size);
VMR_ATTR(offline_size);
VMR_ATTR(movable_size);
VMR_ATTR(state);
VMR_ATTR(failed_rounds);
VMR_ATTR(next_retry_ms);
VMR_ATTR(blocked_by);
VMR_ATTR(requests_plug);
VMR_ATTR(requests_unplug);
VMR_ATTR(requests_unplug_all);
VMR_ATTR(requests_state);
VMR_ATTR(answers_ack);
VMR_ATTR(answers_nack);
VMR_ATTR(answers_busy);
VMR_ATTR(answers_error);
VMR_ATTR(answers_invalid);
VMR_ATTR(answers_timeout);
VMR_ATTR(bytes_plugged);
VMR_ATTR(bytes_unplugged);
VMR_ATTR(bytes_migrated);
VMR_ATTR(alloc_contig_range_failures);
VMR_ATTR(drop_slab_calls);
VMR_ATTR(memory_blocks_added);
VMR_ATTR(memory_blocks_removed);

static struct attribute *vmr_attrs[] = {
	&vmr_attr_region_start.attr,
	&vmr_attr_region_size.attr,
	&vmr_attr_usable_region_size.attr,
	&vmr_attr_block_size.attr,
	&vmr_attr_subblock_size.attr,
	&vmr_attr_memory_block_size.attr,
	&vmr_attr_mode.attr,
	&vmr_attr_node.attr,
	&vmr_attr_requested_size.attr,
	&vmr_attr_plugged_size.attr,
	&vmr_attr_device_plugged_size.attr,
	&vmr_attr_online_size.attr,
	&vmr_attr_offline_size.attr,
	&vmr_attr_movable_size.attr,
	&vmr_attr_state.attr,
	&vmr_attr_failed_rounds.attr,
	&vmr_attr_next_retry_ms.attr,
	&vmr_attr_blocked_by.attr,
	&vmr_attr_requests_plug.attr,
	&vmr_attr_requests_unplug.attr,
	&vmr_attr_requests_unplug_all.attr,
	&vmr_attr_requests_state.attr,
	&vmr_attr_answers_ack.attr,
	&vmr_attr_answers_nack.attr,
	&vmr_attr_answers_busy.attr,
	&vmr_attr_answers_error.attr,
	&vmr_attr_answers_invalid.attr,
	&vmr_attr_answers_timeout.attr,
	&vmr_attr_bytes_plugged.attr,
	&vmr_attr_bytes_unplugged.attr,
	&vmr_attr_bytes_migrated.attr,
	&vmr_attr_alloc_contig_range_failures.attr,
	&vmr_attr_drop_slab_calls.attr,
	&vmr_attr_memory_blocks_added.attr,
	&vmr_attr_memory_blocks_removed.attr,
	NULL,
};

static const struct attribute_group vmr_attr_group = {
	.name = "virtio_mem",
	.attrs = vmr_attrs,
};

/* Removing the group waits for readers under way: none comes after this. */
static void vmr_remove_sysfs(struct vmr_glue *glue)
{
	if (glue->sysfs_group)
		device_remove_group(&glue->vdev->dev, &vmr_attr_group);
	glue->sysfs_group = false;
}

static void vmr_probe_undo_rust(struct vmr_glue *glue)
{
	WRITE_ONCE(glue->removing, true);
	vmr_rs_stop_retry(glue->rust);
	vmr_rs_remove(glue->rust);
	vmr_glue_hotplug_exit(glue);
	vmr_rs_release(glue->rust);
}

static int vmr_probe(struct virtio_device *vdev)
{
	struct vmr_glue *glue;
	int rc;

	BUILD_BUG_ON(sizeof(struct virtio_mem_req) != 24);
	BUILD_BUG_ON(sizeof(struct virtio_mem_resp) != 10);

	/* Requests and responses are exchanged as little-endian bytes (virtio 1.0). */
	if (!virtio_has_feature(vdev, VIRTIO_F_VERSION_1)) {
		dev_err(&vdev->dev, "legacy (pre virtio 1.0) device not supported\n");
		return -ENODEV;
	}
	if (!vdev->config->get) {
		dev_err(&vdev->dev, "config access disabled\n");
		return -EINVAL;
	}
	glue = kzalloc(sizeof(*glue), GFP_KERNEL);
	if (!glue)
		return -ENOMEM;
	glue->vdev = vdev;
	glue->mgid = -1;
	glue->kdump = is_kdump_kernel();
	init_waitqueue_head(&glue->host_resp);
	init_waitqueue_head(&glue->thread_wq);
	vdev->priv = glue;

	glue->vq = virtio_find_single_vq(vdev, vmr_vq_done, "guest-request");
	if (IS_ERR(glue->vq)) {
		rc = PTR_ERR(glue->vq);
		goto out_free;
	}

	rc = vmr_rs_probe(glue, &vdev->dev, &glue->rust);
	if (rc)
		goto out_reset;

	/* As early as possible: hibernation must not start while the device is bound. */
	glue->pm_notifier.notifier_call = vmr_pm_notifier_cb;
	glue->pm_notifier.priority = INT_MAX;
	rc = register_pm_notifier(&glue->pm_notifier);
	if (rc) {
		vmr_probe_undo_rust(glue);
		goto out_reset;
	}
	glue->pm_notifier_registered = true;

	glue->thread = kthread_run(vmr_thread_fn, glue, "vmem_rs/%s", dev_name(&vdev->dev));
	if (IS_ERR(glue->thread)) {
		rc = PTR_ERR(glue->thread);
		dev_err(&vdev->dev, "cannot start the worker thread: %d\n", rc);
		unregister_pm_notifier(&glue->pm_notifier);
		vmr_probe_undo_rust(glue);
		goto out_reset;
	}

	virtio_device_ready(vdev);
	/* What the driver does is shown, not needed: a failure is only logged. */
	rc = device_add_group(&vdev->dev, &vmr_attr_group);
	if (rc)
		dev_warn(&vdev->dev, "no virtio_mem attributes in sysfs: %d\n", rc);
	glue->sysfs_group = !rc;
	vmr_rs_debugfs_init(glue->rust, dev_name(&vdev->dev));
	if (glue->kdump)
		vmr_register_vmcore(glue);
	else
		vmr_glue_kick(glue);
	return 0;

out_reset:
	/* The device may have seen requests: reset it before dropping the queues. */
	virtio_reset_device(vdev);
	vdev->config->del_vqs(vdev);
out_free:
	kfree(glue);
	vdev->priv = NULL;
	return rc;
}

static void vmr_remove(struct virtio_device *vdev)
{
	struct vmr_glue *glue = vdev->priv;

	/* Waits for callbacks and readers under way: none comes after this. */
	vmr_unregister_vmcore(glue);
	vmr_remove_sysfs(glue);
	vmr_rs_debugfs_exit(glue->rust);
	if (glue->pm_notifier_registered)
		unregister_pm_notifier(&glue->pm_notifier);
	WRITE_ONCE(glue->removing, true);
	/* A worker waiting for the device wakes up and gives up. */
	wake_up(&glue->host_resp);
	vmr_rs_stop_retry(glue->rust);
	kthread_stop(glue->thread);

	vmr_rs_remove(glue->rust);
	vmr_glue_hotplug_exit(glue);

	virtio_reset_device(vdev);
	vdev->config->del_vqs(vdev);
	vmr_rs_release(glue->rust);
	kfree(glue);
	vdev->priv = NULL;
}

static void vmr_config_changed(struct virtio_device *vdev)
{
	struct vmr_glue *glue = vdev->priv;

	/*
	 * May run in interrupt context: note it and kick the worker, nothing else. A device
	 * that needs a reset answers no request: a worker waiting for one stops waiting.
	 */
	if (vmr_glue_needs_reset(glue))
		wake_up(&glue->host_resp);
	vmr_rs_config_changed(glue->rust);
	vmr_glue_kick(glue);
}

/*
 * System sleep begins. The worker is frozen already (the freezer stops kernel threads
 * before devices; a round asked to freeze stops between requests), and vmr_rs_freeze()
 * takes the lock every request is sent under: none is in flight, and none is sent until
 * restore. It refuses (-EPERM) if memory is plugged and the device would not keep it.
 * Hibernation never gets here: the PM notifier refused it.
 */
static int vmr_freeze(struct virtio_device *vdev)
{
	struct vmr_glue *glue = vdev->priv;
	int rc;

	rc = vmr_rs_freeze(glue->rust, pm_suspend_target_state == PM_SUSPEND_TO_IDLE);
	if (rc)
		return rc;
	virtio_reset_device(vdev);
	vdev->config->del_vqs(vdev);
	glue->vq = NULL;
	return 0;
}

/*
 * System sleep ends: a new queue, the device ready, the config read again by the worker.
 * If the queue cannot be created the device stays frozen: nothing is sent to it.
 */
static int vmr_restore(struct virtio_device *vdev)
{
	struct vmr_glue *glue = vdev->priv;
	struct virtqueue *vq;

	vq = virtio_find_single_vq(vdev, vmr_vq_done, "guest-request");
	if (IS_ERR(vq)) {
		dev_err(&vdev->dev, "cannot re-create the request queue after sleep: %ld\n",
			PTR_ERR(vq));
		return PTR_ERR(vq);
	}
	glue->vq = vq;
	/* The reset at freeze took any buffers of a lost request back from the device. */
	glue->request_lost = false;
	virtio_device_ready(vdev);
	vmr_rs_restore(glue->rust);
	vmr_glue_kick(glue);
	return 0;
}

static unsigned int vmr_features[] = {
#if defined(CONFIG_NUMA) && defined(CONFIG_ACPI_NUMA)
	VIRTIO_MEM_F_ACPI_PXM,
#endif
	VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE,
	VIRTIO_MEM_F_PERSISTENT_SUSPEND,
};

static const struct virtio_device_id vmr_id_table[] = {
	{ VIRTIO_ID_MEM, VIRTIO_DEV_ANY_ID },
	{ 0 },
};
MODULE_DEVICE_TABLE(virtio, vmr_id_table);

static struct virtio_driver vmr_driver = {
	.feature_table = vmr_features,
	.feature_table_size = ARRAY_SIZE(vmr_features),
	.driver.name = KBUILD_MODNAME,
	.id_table = vmr_id_table,
	.probe = vmr_probe,
	.remove = vmr_remove,
	.config_changed = vmr_config_changed,
	.freeze = vmr_freeze,
	.restore = vmr_restore,
};

/* Called by the Rust module's init and exit. */
int vmr_glue_register_driver(void)
{
	return register_virtio_driver(&vmr_driver);
}

void vmr_glue_unregister_driver(void)
{
	unregister_virtio_driver(&vmr_driver);
}
